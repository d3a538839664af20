"""Issue 21 item 7 pilots (session 23): Table 1 rows of seed 0 with a config
change of how parents enter a child (SETS, e.g. mix_scale=balanced), paired
with the main reproduction's independent seed-0 unit (M = 0 is the same under
every mix setting) and trained with its BO ordering of seed 0.

  SETS=mix_scale=balanced OUT=runs/balanced SRC=runs/repro2/units \
    PYTHONPATH=. python docs/reproduce/item7/pilot.py dense-random dense-bo

Ran from worktrees of main with SRC=/work/benchruns/repro2/units:
balanced/ (58be656, SETS=mix_scale=balanced, OUT=/work/benchruns/balanced) and
nograd/ (SETS=mix_parent_grad=false); their units and settings.json are there.
"""
import os
import shutil
import sys

from scr_jax import reproduce as R

out = os.environ.get("OUT", "runs/balanced")
src = os.environ.get("SRC", "runs/repro2/units")  # the Eq. 3 (sum) reproduction's units
rows = sys.argv[1:] or ["dense-random", "dense-bo"]
sets = tuple(x for x in os.environ.get("SETS", "mix_scale=balanced").split(",") if x)
b = R.Budget(sets=sets, parts=("table1",))
rep, settings = R.open_reproduction(out, b, f"SETS={','.join(sets)} pilot.py " + " ".join(rows))
os.makedirs(os.path.join(out, "units"), exist_ok=True)
for n in ["baselines.default", "search.default.bo.s0", "search.default.bo-oracle.s0",
          "t1.independent.s0", "t1.supervised.s0"]:
  dst = os.path.join(out, "units", n + ".json")
  if not os.path.exists(dst):
    shutil.copy(os.path.join(src, n + ".json"), dst)
units = [u for u in R.plan(rep.b) if u.name in {f"t1.{r}.s0" for r in rows}]
rep.data("default")
R.run_all(rep, units, jobs=1)
