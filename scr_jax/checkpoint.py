"""Orbax checkpoints of the train state, with the config saved beside them."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp

from scr_jax.config import Config
from scr_jax.errors import UserError

_COMMIT_FILE = "commit_success.txt"  # orbax's atomicity_types.COMMIT_SUCCESS_FILE


def probe_writable(workdir: str):
  """Fails early (before any compile or training) if the workdir can't be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "wb") as fh:
      fh.write(b"\0" * 65536)
      fh.flush()
      os.fsync(fh.fileno())
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=opts)


def state_bytes(state: dict) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def check_free_space(workdir: str, state: dict, keep: int):
  """Fails before training if the disk can't hold the checkpoints still to
  come (keep + 1 at peak, minus the step folders already there)."""
  ck = os.path.join(workdir, "checkpoints")
  have = sum(n.isdigit() for n in os.listdir(ck)) if os.path.isdir(ck) else 0
  more = max(keep + 1 - have, 1)
  need = int(1.2 * state_bytes(state) * more) + (1 << 20)
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise UserError(f"workdir {workdir} has {free / 2**20:.1f} MiB free, {more} more "
                    f"checkpoints need about {need / 2**20:.1f} MiB")


def save(mngr: ocp.CheckpointManager, state: dict):
  step = int(jax.device_get(state["step"]))
  # A failing write makes orbax's threads log and print a traceback each; they
  # are held back and dropped on failure (re-emitted on success).
  quiet, held = _DropErrors(), io.StringIO()
  logging.getLogger("absl").addFilter(quiet)
  try:
    with contextlib.redirect_stderr(held):
      mngr.save(step, args=ocp.args.StandardSave(state), force=True)
      mngr.wait_until_finished()
    sys.stderr.write(held.getvalue())
  except (OSError, ValueError, RuntimeError) as e:  # disk full, quota, read-only...
    why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "No space left" in why:
      why = "No space left on device"
    last = _latest_complete(mngr)
    last = "none" if last is None else f"step {last}, intact"
    raise UserError(f"could not write checkpoint step {step} to {mngr.directory} ({why[:200]}); "
                    f"last complete checkpoint: {last}") from None
  finally:
    logging.getLogger("absl").removeFilter(quiet)
  return step


class _DropErrors(logging.Filter):
  def filter(self, record):
    return record.levelno < logging.ERROR


def _complete(mngr: ocp.CheckpointManager, step: int) -> bool:
  # Orbax writes commit_success.txt last (before the atomic rename, or as the
  # commit itself on filesystems without one); a step folder without it is partial.
  return os.path.isfile(os.path.join(os.fspath(mngr.directory), str(step), _COMMIT_FILE))


def _latest_complete(mngr: ocp.CheckpointManager):
  mngr.reload()
  return next((s for s in sorted(mngr.all_steps(), reverse=True) if _complete(mngr, s)), None)


def restore_latest(mngr: ocp.CheckpointManager, like_state: dict):
  """Restores the newest complete checkpoint into the structure of
  `like_state`; returns None when there is none. A killed save leaves an
  `N.orbax-checkpoint-tmp` folder, which orbax never lists; a step folder
  without its commit marker (a copy cut short, a filesystem without atomic
  rename) is moved to `checkpoints.incomplete/` with a one-line warning and
  never loaded."""
  if jax.process_index() == 0:
    for step in sorted(mngr.all_steps(), reverse=True):
      if _complete(mngr, step):
        break
      src = os.path.join(os.fspath(mngr.directory), str(step))
      dst = os.path.join(os.path.dirname(os.fspath(mngr.directory)), "checkpoints.incomplete",
                         f"{step}-{time.time_ns()}")
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
      print(f"warning: checkpoint step {step} is incomplete (no {_COMMIT_FILE}); "
            f"moved to {dst}, not loaded", file=sys.stderr, flush=True)
  step = _latest_complete(mngr)
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"checkpoint step {step} in {mngr.directory} cannot be restored ({why}); "
                    "move it away to resume from an earlier step, or use --no-resume") from None


def save_config(workdir: str, cfg: Config):
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as fh:
    fh.write(cfg.to_json())
  os.replace(tmp, os.path.join(workdir, "config.json"))


def load_config(workdir: str) -> Config:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as fh:
    return Config.from_json(fh.read())
