#!/usr/bin/env python
"""How much of each decoder's input is the factor's own f1 embedding and how
much its parents' M^T u (paper Eq. 3), at the run's initialisation and after
training, for trained single-structure workdirs.

  python experiments/embedding_norms.py [--data builtin[:VARIANT]|DIR] [--split val] [--n 128] W [W ...]

Prints a markdown table: per workdir and factor (V, D, L, A), mean |u_f| /
mean |sum_g M[g, f] u_g| over the first N images of the split, at init
(`init_state(cfg, PRNGKey(cfg.seed))`, what training started from) and at the
newest checkpoint. A ratio parents / own far above 1 means the factor's
decoder mostly reads other factors' embeddings (issue 21 item 7).
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from scr_jax import cliutil, dataset, model, structure, train_step, workdir  # noqa: E402
from scr_jax.config import FACTORS  # noqa: E402
from scr_jax.errors import UserError  # noqa: E402


def norms(nets, params, img_NxSxSx3, st, cfg):
  """(own_4, parents_4) of `structure.parent_norms` for images in [0, 1]."""
  u = nets.apply(params, model.to_model_range(jnp.asarray(img_NxSxSx3)), method=nets.encode)
  return structure.parent_norms(u, st.adjacency(u), cfg.mix_scale)


def main():
  p = cliutil.Parser(prog="embedding_norms.py", description=__doc__.split("\n")[0])
  p.add_argument("--data", default="builtin", help="data spec (default builtin)")
  p.add_argument("--split", default="val", help="train, val or test (default val)")
  p.add_argument("--n", type=int, default=128, help="images (default 128)")
  p.add_argument("workdirs", nargs="+")
  a = p.parse_args()
  if a.n < 1:
    cliutil.fail(f"--n must be >= 1, got {a.n}", 2)
  try:  # every workdir restored before any work
    runs = [workdir.restore(w).single(w, "embedding_norms.py") for w in a.workdirs]
  except UserError as e:
    cliutil.fail(e, 2)
  print("| workdir | structure | step | " + " | ".join(f"{f} own / parents" for f in FACTORS)
        + " |")
  print("|---|---|---|" + "---|" * len(FACTORS))
  images = {}
  for w, r in zip(a.workdirs, runs):
    key = (r.cfg.image_size, r.cfg.crop)
    if key not in images:
      try:
        images[key] = dataset.load_split(a.data, a.split, r.cfg, need_depth=False,
                                         with_gt=False)["images"][:a.n]
      except (UserError, FileNotFoundError) as e:
        cliutil.fail(f"--data {a.data}: {e}", 2)
    init = train_step.init_state(r.cfg, jax.random.PRNGKey(r.cfg.seed))[1].params
    m = r.structure.m
    edges = int((abs(m) > 0).sum())
    label = ("M = 0" if not edges else f"{structure.order_of(m)}, {edges} edges"
             + (f", q = {r.structure.q}" if r.structure.q else ""))
    for step, params in ((0, init), (r.step, r.params)):
      own, par = norms(r.nets, params, images[key], r.structure, r.cfg)
      print(f"| {os.path.basename(os.path.normpath(w))} | {label} | {step} | "
            + " | ".join(f"{o:.2f} / {q:.2f}" for o, q in zip(own, par)) + " |")


if __name__ == "__main__":
  main()
