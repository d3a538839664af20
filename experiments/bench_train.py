#!/usr/bin/env python
"""Train-step speed: median step time per preset, XLA's FLOP count of the step,
and the achieved FLOP/s as a fraction of a dense fp32 matmul measured in the
same run (same process, same machine state).

  python experiments/bench_train.py [--presets cpu_small,paper] [--repeats 5]

Prints a table, then one JSON line (the last line).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scr_jax import config, structure, train  # noqa: E402


def _median_time(fn, repeats):
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def matmul_rate(n=2048, repeats=5):
  """fp32 FLOP/s of an n x n x n matmul (the machine's practical peak)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  t = _median_time(lambda: f(a, b), repeats)
  return 2 * n**3 / t, t


def bench_preset(name, repeats, variant="independent"):
  cfg = config.override(config.get_config(name), [f"variant={variant}"] +
                        (["order=DVAL"] if variant != "independent" else []))
  m, q = structure.resolve(cfg)
  nets, state = train.init_state(cfg, jax.random.PRNGKey(0))
  step = train.make_train_step(nets, cfg, q)
  img = jax.random.uniform(jax.random.PRNGKey(2), (cfg.batch_size, cfg.image_size,
                                                   cfg.image_size, 3))
  m = jnp.asarray(m)
  t0 = time.perf_counter()
  compiled = step.lower(state, img, m).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  holder = [state]

  def run():
    holder[0], met = step(holder[0], img, m)
    return met["loss"]

  jax.block_until_ready(run())  # warm-up (also the first donated step)
  t = _median_time(run, repeats)
  return dict(preset=name, batch=cfg.batch_size, image_size=cfg.image_size,
              step_s=t, images_per_s=cfg.batch_size / t, flops=flops,
              flops_per_s=flops / t, compile_s=compile_s)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="cpu_small,paper")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--matmul-n", type=int, default=2048)
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
  peak, mm_t = matmul_rate(args.matmul_n)
  print(f"fp32 matmul {args.matmul_n}^3: {peak / 1e9:.1f} GFLOP/s ({mm_t * 1e3:.1f} ms)", flush=True)
  rows = []
  for name in args.presets.split(","):
    r = bench_preset(name, args.repeats)
    r["fraction_of_matmul"] = r["flops_per_s"] / peak
    rows.append(r)
    print(f"{name:<10} batch {r['batch']:>3} {r['image_size']}px: step {r['step_s'] * 1e3:9.1f} ms"
          f" | {r['images_per_s']:7.1f} img/s | {r['flops'] / 1e9:8.2f} GFLOP/step"
          f" | {r['flops_per_s'] / 1e9:7.1f} GFLOP/s = {r['fraction_of_matmul']:.2f} x matmul"
          f" | compile {r['compile_s']:.0f}s", flush=True)
  peak2, _ = matmul_rate(args.matmul_n)  # again: the machine may have changed
  print(json.dumps(dict(platform=dev.platform, matmul_flops_per_s=peak,
                        matmul_flops_per_s_after=peak2, presets=rows,
                        load_average=os.getloadavg()[0])))


if __name__ == "__main__":
  main()
