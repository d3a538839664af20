#!/usr/bin/env python
"""Does the view net track the pose? Predicted vs generator yaw / pitch on a
test split with the generator's ground truth, for trained workdirs
(single-structure ones).

  python experiments/view_stats.py [--data builtin[:VARIANT]|DIR] [--matrix] W [W ...]
  python experiments/view_stats.py --parallax [--data SPEC ...]

Prints one line per workdir: predicted and true yaw std, their correlation,
the mean predicted pitch against the data's (the canonical frame does not fix
a global pitch offset) and the yaw error. `run.py diagnose` gives all
diagnostics (light, depth sign, shape spread) and pictures.

`--parallax` (no workdirs) prints, per --data, how the object's silhouette
moves sideways with the true yaw (`diagnostics.silhouette_parallax`): a
property of the data (negative on the car, positive on every head-like family).
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))

import numpy as np  # noqa: E402

from scr_jax import cliutil, dataset, diagnostics, workdir  # noqa: E402
from scr_jax.errors import UserError  # noqa: E402
from scr_jax.evaluator import Evaluator  # noqa: E402


def main():
  p = cliutil.Parser(prog="view_stats.py", description=__doc__.split("\n")[0])
  p.add_argument("--data", action="append",
                 help="data spec (default builtin); with --parallax it may be repeated")
  p.add_argument("--parallax", action="store_true",
                 help="only the data's silhouette parallax (test split, true yaw): slope in "
                 "half-widths per radian and correlation")
  p.add_argument("--matrix", action="store_true",
                 help="also the correlation of every predicted pose component with every "
                 "true one (pitch, yaw, roll, x / y shift): which truth each output tracks")
  p.add_argument("workdirs", nargs="*")
  args = p.parse_args()
  datas = args.data or ["builtin"]
  if args.parallax:
    if args.workdirs:
      cliutil.fail("--parallax reads data only; give no workdirs", 2)
    for spec in datas:
      print(parallax_line(spec), flush=True)
    return
  if not args.workdirs:
    cliutil.fail("give one or more trained workdirs (or --parallax)", 2)
  if len(datas) > 1:
    cliutil.fail("one --data for workdirs", 2)
  args.data = datas[0]
  for wd in args.workdirs:
    try:
      r = workdir.restore(wd)
      if r.k:
        raise UserError(f"{wd} is a candidates workdir; give a single-structure one")
      test = dataset.load_split(args.data, "test", r.cfg)
      if "gt" not in test:
        raise UserError(f"{args.data}: the test split has no ground-truth sidecar")
    except (UserError, FileNotFoundError) as e:
      cliutil.fail(f"{wd}: {e}", 2)
    pred = Evaluator(r.nets, r.cfg).factors(r.params, test["images"], r.structure)["view"]
    true = test["gt"]["view"]
    d = diagnostics.view_errors(pred, true)
    yaw_p, yaw_t = np.rad2deg(pred[:, 1]), np.rad2deg(true[:, 1])
    print(f"{wd} (step {r.step}): predicted yaw std {yaw_p.std():.1f} deg, true "
          f"{yaw_t.std():.1f}, correlation {d['view_yaw_corr']:.3f}, error "
          f"{d['view_yaw_mae_deg']:.1f} deg; mean pitch predicted "
          f"{np.rad2deg(pred[:, 0]).mean():.1f} deg, true {np.rad2deg(true[:, 0]).mean():.1f}",
          flush=True)
    if args.matrix:
      print(pose_matrix(np.asarray(pred), np.asarray(true)), flush=True)


def parallax_line(spec: str) -> str:
  """`spec`'s test-split silhouette parallax (read at cpu_small's size) as one
  line; a bad spec exits 2."""
  from scr_jax import config
  try:
    test = dataset.load_split(spec, "test", config.get_config("cpu_small"))
    if "gt" not in test:
      raise UserError(f"{spec}: the test split has no ground-truth sidecar (true yaw)")
  except (UserError, FileNotFoundError) as e:
    cliutil.fail(str(e), 2)
  par = diagnostics.silhouette_parallax(test["images"], np.asarray(test["gt"]["view"])[:, 1])
  return (f"{spec}: silhouette centroid moves {par['slope']:+.3f} half-widths per radian of "
          f"yaw (correlation {par['corr']:+.2f}, {len(test['images'])} test images)")


POSE = ("pitch", "yaw", "roll", "x shift", "y shift")


def pose_matrix(pred_Nx6, true_Nx6) -> str:
  """Markdown: Pearson correlation of each predicted pose component (rows)
  with each true one (columns; '-' where one side does not vary), and the
  slope of the predicted yaw regressed on the true yaw (1 = full scale)."""
  lines = ["| predicted \\ true | " + " | ".join(POSE) + " |", "|---" * (len(POSE) + 1) + "|"]
  for i, name in enumerate(POSE):
    cells = []
    for j in range(len(POSE)):
      a, b = pred_Nx6[:, i], true_Nx6[:, j]
      cells.append("-" if a.std() < 1e-9 or b.std() < 1e-9 else f"{diagnostics.pearson(a, b):+.2f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  t = true_Nx6[:, 1] - true_Nx6[:, 1].mean()
  slope = float(np.dot(pred_Nx6[:, 1] - pred_Nx6[:, 1].mean(), t) / max(np.dot(t, t), 1e-12))
  return "\n".join(lines) + f"\npredicted yaw = {slope:.2f} x true yaw + ... (least squares)"


if __name__ == "__main__":
  main()
