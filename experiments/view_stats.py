#!/usr/bin/env python
"""Does the view net track the pose? Predicted vs generator yaw / pitch on the
built-in test split for trained workdirs (single-structure ones).

  python experiments/view_stats.py W [W ...]

Prints one line per workdir: predicted and true yaw std, their correlation,
and the mean predicted pitch (the data's pitch is within +-5 degrees).
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import run as cli  # noqa: E402


def main():
  if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(2)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from scr_jax import data, model
  for wd in sys.argv[1:]:
    try:
      cfg, nets, params, m, q, step = cli._restore(wd)
    except (cli.UserError, FileNotFoundError) as e:
      print(f"error: {wd}: {e}", file=sys.stderr)
      sys.exit(2)
    if m.ndim == 3:
      print(f"error: {wd} is a candidates workdir; give a single-structure one", file=sys.stderr)
      sys.exit(2)
    root = cli.ensure_builtin(cfg.image_size)
    with open(os.path.join(root, "meta.json")) as fh:
      meta = json.load(fh)
    gen = data.GenConfig.from_json(meta["config"])
    test = cli.load_split("builtin", "test", cfg)
    view = jax.jit(lambda p, x: model.factors(nets, p, x, jnp.asarray(m), cfg, q)["view"])
    pred = np.concatenate([np.asarray(view(params, test["images"][i:i + 100]))
                           for i in range(0, len(test["images"]), 100)])
    true = np.stack([data.sample_params(data.sample_rng(meta["seed"], "test", int(n)), gen)["view"]
                     for n in test["names"]])
    yaw_p, yaw_t = np.rad2deg(pred[:, 1]), np.rad2deg(true[:, 1])
    print(f"{wd} (step {step}): predicted yaw std {yaw_p.std():.1f} deg, true {yaw_t.std():.1f}, "
          f"correlation {np.corrcoef(yaw_p, yaw_t)[0, 1]:.3f}; mean predicted pitch "
          f"{np.rad2deg(pred[:, 0]).mean():.1f} deg", flush=True)


if __name__ == "__main__":
  main()
