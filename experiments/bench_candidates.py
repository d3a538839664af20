#!/usr/bin/env python
"""Training K candidate structures at once (vmap over params, opt state and M)
versus K sequential single runs, with the same number of steps, in one process.

  python experiments/bench_candidates.py [--preset cpu_small] [--k 24] [--steps 3] [--repeats 3]

Both sides run the same compiled programs every repeat (compile excluded):
  vmapped:    `steps` calls of train_step.make_candidate_step on K stacked states;
  sequential: K x `steps` calls of train_step.make_train_step, one candidate at a time.
Prints a table, then one JSON line (the last line) with vmap_over_sequential_ratio
(< 1 means the vmapped run is cheaper).
"""
import argparse
import json
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scr_jax import cliutil, config, nets as nets_lib, structure, train_step  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="cpu_small")
  ap.add_argument("--k", type=int, default=24)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--matmul-max-patch", type=int,
                  help="override nets_lib.MATMUL_MAX_PATCH (0: every conv on the lax path)")
  args = ap.parse_args(argv)
  if args.matmul_max_patch is not None:
    nets_lib.MATMUL_MAX_PATCH = args.matmul_max_patch
  cfg = config.get_config(args.preset)
  orders = [structure.ALL_ORDERS[i % 24] for i in range(args.k)]
  ms = structure.candidates(orders)
  ms = ms.replace(m=jnp.asarray(ms.m))
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  imgs = jax.random.uniform(jax.random.PRNGKey(1), (args.steps, cfg.batch_size,
                                                    cfg.image_size, cfg.image_size, 3))
  single = train_step.make_train_step(nets, cfg)
  multi = train_step.make_candidate_step(nets, cfg)

  t = time.perf_counter()
  single_c = single.lower(state, imgs[0], ms.candidate(0)).compile()
  compile_single = time.perf_counter() - t
  stacked = train_step.stack_state(state, args.k)
  t = time.perf_counter()
  multi_c = multi.lower(stacked, imgs[0], ms).compile()
  ms = ms.bare()
  compile_multi = time.perf_counter() - t

  cands = [ms.candidate(k).bare() for k in range(args.k)]  # as the compiled step takes them

  def run_seq():
    # Fresh copies each repeat: the step donates its input state.
    for k in range(args.k):
      st = jax.tree_util.tree_map(jnp.copy, state)
      for s in range(args.steps):
        st, met = single_c(st, imgs[s], cands[k])
      jax.block_until_ready(st)

  def run_vmap():
    st = jax.tree_util.tree_map(jnp.copy, stacked)
    for s in range(args.steps):
      st, met = multi_c(st, imgs[s], ms)
    jax.block_until_ready(st)
    return met

  seq_t, vm_t = [], []
  run_seq(), run_vmap()  # warm-up (allocations, thread pools)
  for r in range(args.repeats):  # interleaved so load changes hit both sides
    t = time.perf_counter(); run_seq(); seq_t.append(time.perf_counter() - t)
    t = time.perf_counter(); run_vmap(); vm_t.append(time.perf_counter() - t)
    cliutil.log(f"repeat {r + 1}/{args.repeats}: sequential {seq_t[-1]:.2f}s, "
                f"vmapped {vm_t[-1]:.2f}s")
  seq, vm = float(np.median(seq_t)), float(np.median(vm_t))
  cand_steps = args.k * args.steps
  dev = jax.devices()[0]
  print(f"\n{args.preset}, K={args.k} candidates x {args.steps} steps, batch {cfg.batch_size}, "
        f"{dev.platform} ({getattr(dev, 'device_kind', '')}), median of {args.repeats}")
  print(f"{'':<12}{'total s':>10}{'ms / candidate-step':>22}{'compile s':>12}")
  print(f"{'sequential':<12}{seq:>10.2f}{1e3 * seq / cand_steps:>22.1f}{compile_single:>12.1f}")
  print(f"{'vmapped':<12}{vm:>10.2f}{1e3 * vm / cand_steps:>22.1f}{compile_multi:>12.1f}")
  res = dict(preset=args.preset, k=args.k, steps=args.steps, platform=dev.platform,
             compile_single_s=compile_single, compile_vmapped_s=compile_multi,
             sequential_s=seq, vmapped_s=vm,
             ms_per_candidate_step_sequential=1e3 * seq / cand_steps,
             ms_per_candidate_step_vmapped=1e3 * vm / cand_steps,
             vmap_over_sequential_ratio=vm / seq)
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
