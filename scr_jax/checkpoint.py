"""Orbax checkpoints of the train state, with the config saved beside them."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from scr_jax.config import Config
from scr_jax.errors import UserError


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


def save(mngr: ocp.CheckpointManager, state: dict):
  step = int(jax.device_get(state["step"]))
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  return step


def restore_latest(mngr: ocp.CheckpointManager, like_state: dict):
  """Restores the newest complete checkpoint into the structure of
  `like_state`; returns None when there is none. Orbax writes each step into a
  temporary folder and renames it when complete, so half-written steps are
  never listed."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


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
