#!/usr/bin/env python
"""Does the view net track the pose? Predicted vs generator yaw / pitch on a
test split with the generator's ground truth, for trained workdirs
(single-structure ones).

  python experiments/view_stats.py [--data builtin[:VARIANT]|DIR] W [W ...]

Prints one line per workdir: predicted and true yaw std, their correlation,
the mean predicted pitch against the data's (the canonical frame does not fix
a global pitch offset) and the yaw error. `run.py diagnose` gives all
diagnostics (light, depth sign, shape spread) and pictures.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import run as cli  # noqa: E402


def main():
  p = cli._Parser(prog="view_stats.py", description=__doc__.split("\n")[0])
  p.add_argument("--data", default="builtin")
  p.add_argument("workdirs", nargs="+")
  args = p.parse_args()
  import numpy as np
  from scr_jax import diagnostics
  for wd in args.workdirs:
    try:
      cfg, nets, params, m, q, step = cli._restore(wd)
      if m.ndim == 3:
        raise cli.UserError(f"{wd} is a candidates workdir; give a single-structure one")
      test = cli.load_split(args.data, "test", cfg)
      if "gt" not in test:
        raise cli.UserError(f"{args.data}: the test split has no ground-truth sidecar")
    except (cli.UserError, FileNotFoundError) as e:
      cli._fail(f"{wd}: {e}", 2)
    pred = diagnostics.predict_factors(nets, params, test["images"], m, cfg, q)["view"]
    true = test["gt"]["view"]
    d = diagnostics.view_errors(pred, true)
    yaw_p, yaw_t = np.rad2deg(pred[:, 1]), np.rad2deg(true[:, 1])
    print(f"{wd} (step {step}): predicted yaw std {yaw_p.std():.1f} deg, true {yaw_t.std():.1f}, "
          f"correlation {d['view_yaw_corr']:.3f}, error {d['view_yaw_mae_deg']:.1f} deg; mean "
          f"pitch predicted {np.rad2deg(pred[:, 0]).mean():.1f} deg, true "
          f"{np.rad2deg(true[:, 0]).mean():.1f}", flush=True)


if __name__ == "__main__":
  main()
