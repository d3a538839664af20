#!/usr/bin/env python
"""Does it learn shape? Trains a preset on the built-in data for a wall-clock
budget, then reports test SIDE / MAD next to the two reference baselines.

  python experiments/bench_quality.py [--preset cpu_small] [--budget 600]
      [--variant independent] [--order DVAL] [--set key=value ...] [--seed 0]

Prints a table, then a JSON line with the figures (the last line).
The budget counts from the first training step: compilation and periodic
validation are inside it; data generation and the final test are not.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import run as cli  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="cpu_small")
  p.add_argument("--budget", type=float, default=600.0, help="training wall-clock seconds")
  p.add_argument("--variant", default="independent")
  p.add_argument("--order")
  p.add_argument("--q")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=100000, help="upper bound; the budget usually stops first")
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--workdir", default=None)
  args = p.parse_args()
  from scr_jax import metrics, model, structure, train
  wd = args.workdir or os.path.join(ROOT, "runs", f"bench_quality_{args.preset}_{args.variant}_s{args.seed}")
  targs = argparse.Namespace(preset=args.preset, data="builtin", workdir=wd, set=args.set,
                             steps=args.steps, seed=args.seed, variant=args.variant,
                             order=args.order, q=args.q, structure=None, resume=False,
                             distributed=False, max_seconds=args.budget)
  t0 = time.time()
  try:
    res = cli.cmd_train(targs)
  except cli.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  cfg = cli.make_config(targs)
  test = cli.load_split("builtin", "test", cfg)
  m, q = structure.resolve(cfg)
  eval_fn = train.make_eval_fn(res["nets"], cfg, q)
  summ, _, _ = train.evaluate(eval_fn, res["state"]["params"], test, m, cfg)
  train_gt = cli.load_split("builtin", "train", cfg)["depth"]
  base = metrics.baseline_summaries(test["depth"], train_gt, model.camera(cfg))
  rows = [(f"{args.variant} SCR", summ)] + list(base.items())
  print(f"\n{args.preset}, {res['step']} steps in {res['seconds']:.0f}s of training "
        f"({time.time() - t0:.0f}s in all), test n={summ['n']}")
  print(f"{'method':<24}{'SIDE x1e-2':>16}{'MAD deg':>16}")
  for name, s in rows:
    print(f"{name:<24}{s['side_mean']:>9.3f} ±{s['side_std']:5.3f}{s['mad_mean']:>9.2f} ±{s['mad_std']:5.2f}")
  ratio = summ["mad_mean"] / base["average GT depth"]["mad_mean"]
  print(f"MAD / average-GT-depth MAD = {ratio:.3f}")
  print(json.dumps(dict(preset=args.preset, variant=args.variant, seed=args.seed,
                        steps=res["step"], train_seconds=res["seconds"],
                        side=summ["side_mean"], mad=summ["mad_mean"],
                        mad_unsup3d=summ["mad_unsup3d_mean"],
                        mad_avg_gt=base["average GT depth"]["mad_mean"],
                        mad_const=base["constant null depth"]["mad_mean"],
                        side_avg_gt=base["average GT depth"]["side_mean"],
                        side_const=base["constant null depth"]["side_mean"],
                        mad_ratio_vs_avg_gt=ratio)))


if __name__ == "__main__":
  main()
