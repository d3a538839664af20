"""Session 23: the main reproduction's dose units of seed 0, run in a side OUT
while the main OUT was locked by its Table 1 driver; the unit JSONs were then
copied into the main OUT's units/ (same budget and config, only --parts differs).

  OUT=/work/benchruns/dose_s0 SRC=/work/benchruns/repro2/units PYTHONPATH=. \\
    python docs/reproduce/item7/dose_s0.py     # ran from a worktree at 685e4ec
"""
import os
import shutil

from scr_jax import reproduce as R

out = os.environ.get("OUT", "runs/dose_s0")
src = os.environ.get("SRC", "runs/repro2/units")
b = R.Budget(parts=("dose",))
rep, settings = R.open_reproduction(out, b, "docs/reproduce/item7/dose_s0.py (side OUT)")
os.makedirs(os.path.join(out, "units"), exist_ok=True)
shutil.copy(os.path.join(src, "search.default.bo.s0.json"),
            os.path.join(out, "units", "search.default.bo.s0.json"))
want = ["dose.a0.3.s0", "dose.a0.01.s0"]
units = sorted([u for u in R.plan(rep.b) if u.name in want], key=lambda u: want.index(u.name))
rep.data("default")
R.run_all(rep, units, jobs=1)
