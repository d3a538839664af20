"""Parallelism: the device mesh, batch sharding, candidate placement and the
multi-host helpers (barrier, any_process, ahead-of-time compile), and one
core per worker process for the batch producers (`core_slots`, `on_core`).

One data-parallel axis ("data") over all devices, local and, after
jax.distributed, remote. Every process holds the same global batch and
contributes its slice (`shard_batch`), or loads only its own rows
(`shard_local_batch`, as `fit` does); K candidates are sharded over devices
when K divides evenly (`place_candidates`).
"""
from __future__ import annotations

import gc
import os
import shutil
import sys

import jax
import numpy as np

from scr_jax import structure as structure_lib
from scr_jax.errors import UserError


def data_mesh():
  """1-D mesh over all devices (local and, after jax.distributed, remote)."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def check_batch_size(batch_size: int, what: str = "batch_size"):
  """The batch is split evenly over all devices (the "data" axis): one line,
  before any work, when `batch_size` does not divide over them.

  Raises:
    UserError: naming the batch size, the device count and the nearest fits.
  """
  n = len(jax.devices())
  if batch_size % n == 0:
    return
  lo, hi = batch_size // n * n, -(-batch_size // n) * n
  fits = " or ".join(f"{what}={b}" for b in (lo, hi) if b > 0)
  raise UserError(f"{what} {batch_size} does not divide over the {n} devices JAX sees "
                  f"({jax.devices()[0].platform}): the batch is split evenly over them; use a "
                  f"multiple of {n} (--set {fits}) or fewer devices (CUDA_VISIBLE_DEVICES, "
                  "XLA_FLAGS=--xla_force_host_platform_device_count)")


def shard_batch(x, mesh):
  """Puts a global host batch on the mesh, split along the batch axis. With
  several processes (multi-host), every process holds the same global batch
  (same seed, same indices) and contributes its own contiguous slice."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  per = x.shape[0] // jax.process_count()
  local = x[jax.process_index() * per:(jax.process_index() + 1) * per]
  return jax.make_array_from_process_local_data(sharding, local)


def shard_local_batch(x_local, mesh):
  """Puts this process's rows of a global batch (dataset.Batches with
  shard=(process index, process count)) on the mesh, split along the batch axis."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  if jax.process_count() == 1:
    return jax.device_put(x_local, sharding)
  return jax.make_array_from_process_local_data(sharding, x_local)


def replicate(tree, mesh):
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put(tree, sharding)


def place_candidates(state_K, structure_K, mesh):
  """Shards the candidate axis over the devices when it divides evenly (each
  device trains whole candidates, the batch is replicated); otherwise keeps
  candidates replicated and the batch sharded (data parallel). Returns
  (state_K, structure_K, by_candidate)."""
  k, ndev = structure_K.k, len(mesh.devices.flat)
  if ndev > 1 and k % ndev == 0:
    cand = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    put = lambda x: jax.device_put(x, cand)
    state_K = state_K.replace(params=jax.tree_util.tree_map(put, state_K.params),
                              opt_state=jax.tree_util.tree_map(put, state_K.opt_state),
                              step=replicate(state_K.step, mesh))
    return state_K, put(structure_K), True
  return replicate(state_K, mesh), replicate(structure_K, mesh), False


def barrier(name: str, timeout_s: float = 1800.0):
  """Waits until every process reaches `name` (no-op with one process).

  Uses the coordination service, whose timeout we choose, rather than a
  collective: the CPU (gloo) collective context gives up after 30 s, and
  processes that compile at different speeds drift apart by more than that.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client has no public accessor
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def any_process(flag: bool) -> bool:
  """True if `flag` is true on any process, so all processes stop together."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def compile_in_step(fn, *args):
  """With several processes, compiles `fn` ahead of time and waits for all
  processes before the first collective runs; otherwise returns `fn`."""
  if jax.process_count() == 1:
    return fn
  compiled = fn.lower(*args).compile()
  barrier(f"compiled-{getattr(fn, '__name__', 'fn')}")
  return lambda *a: compiled(*structure_lib.bare_args(a))


def release_programs():
  """Drops every compiled XLA program this process holds: jax's caches and
  the functools caches in scr_jax that keep jitted functions alive. Why: each
  XLA:CPU executable maps its own code pages, and one process that keeps
  every program of a long job (reproduce's tens of units, the test suite)
  runs past the kernel's vm.max_map_count (65530) and segfaults. The
  persistent compilation cache on disk keeps the recompiles cheap."""
  for name, module in list(sys.modules.items()):
    if not name.startswith("scr_jax") or module is None:
      continue
    for value in list(vars(module).values()):
      clear = getattr(value, "cache_clear", None)
      if callable(clear) and hasattr(value, "cache_info"):
        clear()
  jax.clear_caches()
  gc.collect()


def core_slots(jobs: int):
  """One CPU core per worker slot (cycling over this process's affinity), or
  None (jobs <= 1, or no `taskset`): no pinning. Two XLA CPU processes each
  spreading threads over both cores of a 2-core machine ran a cpu_small step
  in 377 ms; pinned one per core, 353 ms (experiments/bench_train.py, two at
  a time)."""
  if jobs <= 1 or shutil.which("taskset") is None:
    return None
  cores = sorted(os.sched_getaffinity(0))
  return [cores[i % len(cores)] for i in range(jobs)]


def on_core(cmd: list, core) -> list:
  """cmd run on one core (`taskset -c core`), or unchanged for core None."""
  return cmd if core is None else ["taskset", "-c", str(core)] + list(cmd)
