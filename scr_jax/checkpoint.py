"""Orbax checkpoints of the train state, each with the settings that made it.

Every step `W/checkpoints/N/` is one orbax composite of three items, committed
whole or not at all (one atomic rename of the step folder):
  state/     the train state {params, opt_state, step} (StandardSave)
  settings/  the resolved config, the structure trained (variant, M, q,
             candidate orderings) and the training data (path, image count,
             content hash) (JsonSave)
  data/      the training batches' iterator state (`dataset.Batches.state()`)
Evaluation rebuilds the model from the settings of the checkpoint it
restores, and a resume is compared with them before any work
(`check_resume`, called by `workdir.Run`). `W/config.json` (and
`adjacency.json`) describe the latest run for people.
Older step folders still restore: orbax's single item `default/` with the
settings and data state as side files (`scr_settings.json`,
`data_state.json`) beside it, or without them (settings then read from
config.json, with a note).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from scr_jax import cliutil, jsonio
from scr_jax.config import FACTORS, HARMLESS_FIELDS, Config
from scr_jax.errors import UserError

_COMMIT_FILE = "commit_success.txt"  # orbax's atomicity_types.COMMIT_SUCCESS_FILE
# The composite items of a step; LEGACY_ITEM: the one item of older steps.
STATE_ITEM, SETTINGS_ITEM, DATA_ITEM, LEGACY_ITEM = "state", "settings", "data", "default"
# Side files of older steps (written beside orbax's files after its commit).
SETTINGS_FILE = "scr_settings.json"
DATA_STATE_FILE = "data_state.json"


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  """The orbax manager of W/checkpoints (created if missing): composite steps
  (state, settings, data), older single-item steps readable (`restore_step`).
  `workdir.Run` builds one per run."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=opts,
                               item_names=(STATE_ITEM, SETTINGS_ITEM, DATA_ITEM, LEGACY_ITEM))


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(mngr.directory), str(step))


def _is_composite(mngr: ocp.CheckpointManager, step: int) -> bool:
  return os.path.isdir(os.path.join(_step_dir(mngr, step), STATE_ITEM))


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


def save(mngr: ocp.CheckpointManager, state: dict, settings: dict | None = None,
         data_state: dict | None = None):
  """Saves `state` as step state["step"], with `settings` (from `run_settings`,
  stamped with the step and the time) and `data_state`
  (`dataset.Batches.state()`) as items of the same orbax step: one commit, so
  a step on disk always has the settings it was saved with. Returns the step.

  Raises:
    UserError: the write failed (disk full, read-only...): one line naming the
      last complete checkpoint.
  """
  step = int(jax.device_get(state["step"]))
  items = {STATE_ITEM: ocp.args.StandardSave(state)}
  if settings is not None:
    items[SETTINGS_ITEM] = ocp.args.JsonSave(dict(
        settings, step=step,
        saved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
  if data_state is not None:
    items[DATA_ITEM] = ocp.args.JsonSave(data_state)
  # A failing write makes orbax's threads log and print a traceback each; they
  # are held back and dropped on failure (re-emitted on success).
  quiet, held = _DropErrors(), io.StringIO()
  logging.getLogger("absl").addFilter(quiet)
  try:
    with contextlib.redirect_stderr(held):
      mngr.save(step, args=ocp.args.Composite(**items), force=True)
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


def _read_item(mngr: ocp.CheckpointManager, step: int, item: str, side_file: str):
  """JSON item `item` of step `step` (a composite step), or the older side file
  `side_file` in its folder; None when the step has neither."""
  if _is_composite(mngr, step):
    if not os.path.isdir(os.path.join(_step_dir(mngr, step), item)):
      return None
    return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
  path = os.path.join(_step_dir(mngr, step), side_file)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8-sig") as fh:
    return json.load(fh)


def load_data_state(mngr: ocp.CheckpointManager, step: int):
  """The data iterator state saved with checkpoint `step` (None: none saved or
  unreadable, e.g. a checkpoint older than it; the batches are a function of
  the step, so the loader then starts fresh at `step`)."""
  try:
    return _read_item(mngr, step, DATA_ITEM, DATA_STATE_FILE)
  except Exception:  # noqa: BLE001 (orbax wraps a bad item in its own errors)
    return None


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
  step = latest_step(mngr)
  return None if step is None else restore_step(mngr, step, like_state)


def latest_step(mngr: ocp.CheckpointManager):
  """The newest complete step (None: no checkpoint), after moving incomplete
  step folders aside as `restore_latest` says."""
  if jax.process_index() == 0:
    for step in sorted(mngr.all_steps(), reverse=True):
      if _complete(mngr, step):
        break
      src = os.path.join(os.fspath(mngr.directory), str(step))
      dst = os.path.join(os.path.dirname(os.fspath(mngr.directory)), "checkpoints.incomplete",
                         f"{step}-{time.time_ns()}")
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
      cliutil.log(f"warning: checkpoint step {step} is incomplete (no {_COMMIT_FILE}); "
            f"moved to {dst}, not loaded")
  return _latest_complete(mngr)


def _onto_this_machine(leaf):
  """The restore target of one leaf: its shape and dtype, placed as `leaf` is
  (a concrete array) or, for a shape-only leaf, on this process's first
  device. Without a placement orbax would rebuild the saving machine's
  sharding, which fails on another device count ("Topology mismatch")."""
  s = ocp.utils.to_shape_dtype_struct(leaf)
  if getattr(s, "sharding", None) is None:
    s = jax.ShapeDtypeStruct(s.shape, s.dtype,
                             sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return s


def restore_step(mngr: ocp.CheckpointManager, step: int, like_state: dict,
                 hint: str = "move it away to resume from an earlier step, or use --no-resume"):
  """Restores checkpoint `step` into the structure of `like_state`, onto this
  machine's devices whatever device count the saving machine had (leaves of
  `like_state` that are arrays keep their placement; shape-only leaves, e.g.
  from jax.eval_shape, go to the first local device).

  hint: what the one-line error tells the user to do (resume vs. inference).
  Raises:
    UserError: the checkpoint does not fit `like_state` or cannot be read.
  """
  abstract = jax.tree_util.tree_map(_onto_this_machine, like_state)
  item = STATE_ITEM if _is_composite(mngr, step) else LEGACY_ITEM
  try:
    return mngr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(abstract)}))[item]
  except Exception as e:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"checkpoint step {step} in {mngr.directory} cannot be restored ({why}); "
                    f"{hint}") from None


def save_config(workdir: str, cfg: Config):
  jsonio.write_text(os.path.join(workdir, "config.json"), cfg.to_json())


def save_adjacency(workdir: str, structure: dict):
  """W/adjacency.json: the structure of the latest run (factors, M, q, variant, orders)."""
  jsonio.write_json(os.path.join(workdir, "adjacency.json"),
                    dict(factors=list(FACTORS), **structure), sort_keys=True)


def save_run_files(workdir: str, settings: dict):
  """W/config.json and W/adjacency.json of the run `settings` (`run_settings`)
  describe: what people and `predict` read (evaluation reads the settings
  saved in the checkpoint)."""
  save_config(workdir, settings_config(settings))
  save_adjacency(workdir, settings["structure"])


def load_config(workdir: str) -> Config:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found: is {workdir} a training workdir?")
  with open(path, encoding="utf-8-sig") as fh:  # (edited with Notepad: a BOM)
    return Config.from_json(fh.read())


def has_checkpoints(workdir: str) -> bool:
  """True if W/checkpoints holds any step folder (complete or not)."""
  ck = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ck) and any(n.split(".")[0].isdigit() for n in os.listdir(ck))


# ----------------------------------------------------------------------------
# Run settings: what produced a checkpoint, saved with it, compared on resume.
# ----------------------------------------------------------------------------

def run_settings(cfg: Config, structure, data=None) -> dict:
  """The settings that decide what a run learns, as saved with each checkpoint.

  Args:
    cfg: the resolved config.
    structure: the `structure.Structure` trained (M 4x4 or Kx4x4 candidates,
      q, variant, candidate orderings).
    data: dict with any of `spec` (the --data argument, a path or 'builtin'),
      and the keys of `dataset.fingerprint`.
  Returns:
    A JSON-able dict {config, structure, data}; the config's `variant` (and
    `q`, for dynamic SCR) are those of the structure trained.
  """
  conf = json.loads(cfg.to_json())
  conf["variant"] = structure.variant
  if structure.q:
    conf["q"] = structure.q
  return dict(config=conf, structure=structure.record(), data=dict(data or {}))


def load_settings(mngr: ocp.CheckpointManager | str, step: int):
  """The settings saved in checkpoint `step` (None: made before they were saved).
  mngr: the run's manager, or a workdir path (a manager is made for the call:
  for tests and tools; a run reads through its own).

  Raises:
    UserError: they are there but cannot be read.
  """
  if isinstance(mngr, str):
    mngr = manager(mngr)
  try:
    return _read_item(mngr, step, SETTINGS_ITEM, SETTINGS_FILE)
  except Exception as e:  # orbax wraps a bad JSON item in its own errors
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"the settings of checkpoint step {step} in {mngr.directory} cannot be "
                    f"read ({why}); move that checkpoint away") from None


def legacy_settings(workdir: str):
  """Settings of a workdir made before they were saved per checkpoint: its
  config.json and adjacency.json (None if either is missing)."""
  cpath, apath = (os.path.join(workdir, n) for n in ("config.json", "adjacency.json"))
  if not (os.path.exists(cpath) and os.path.exists(apath)):
    return None
  with open(cpath, encoding="utf-8-sig") as fh:
    cfg = json.load(fh)
  with open(apath, encoding="utf-8-sig") as fh:
    adj = json.load(fh)
  return dict(config=cfg, structure=dict(variant=adj.get("variant", cfg.get("variant")),
                                         q=adj.get("q"), M=adj["M"], orders=adj.get("orders")),
              data={})


def settings_config(settings: dict) -> Config:
  """The Config of saved settings (validated)."""
  return Config.from_json(json.dumps(settings["config"]))


def _edges(m) -> str:
  m = np.asarray(m)
  if m.ndim == 3:
    return f"{m.shape[0]} candidate structures"
  e = [f"{FACTORS[i]}->{FACTORS[j]}" + ("" if m[i, j] == 1 else f"({m[i, j]:.3g})")
       for i, j in zip(*np.nonzero(m))]
  return "edges " + ",".join(e) if e else "no edges"


def _data_text(d: dict) -> str:
  return f"{d['n_images']} images {'x'.join(map(str, d['image_shape']))} (hash {d['hash'][:8]})"


def compare_settings(old: dict, new: dict):
  """Differences between saved and requested settings.

  Returns:
    (changed, harmless): lists of (name, old value, new value) as short
    strings. `changed` would change what the weights learn; `harmless` are
    config.HARMLESS_FIELDS and the data path when the content is the same.
    Fields one side does not have (an older workdir) are not compared.
  """
  changed, harmless = [], []
  oc, nc = old.get("config", {}), new.get("config", {})
  for name in sorted(set(oc) & set(nc)):
    if oc[name] != nc[name]:
      (harmless if name in HARMLESS_FIELDS else changed).append((name, repr(oc[name]),
                                                                 repr(nc[name])))
  os_, ns = old.get("structure", {}), new.get("structure", {})
  if "M" in os_ and "M" in ns:
    om, nm = np.asarray(os_["M"], np.float32), np.asarray(ns["M"], np.float32)
    if om.shape != nm.shape or not np.array_equal(om, nm):
      changed.append(("M", _edges(om), _edges(nm)))
  for name in ("q", "orders"):
    if name in os_ and name in ns and os_[name] != ns[name]:
      changed.append((name, repr(os_[name]), repr(ns[name])))
  od, nd = old.get("data", {}), new.get("data", {})
  if "hash" in od and "hash" in nd and (od["hash"], od["n_images"]) != (nd["hash"], nd["n_images"]):
    changed.append(("data", _data_text(od), _data_text(nd)))
  elif od.get("spec") and nd.get("spec") and od["spec"] != nd["spec"]:
    # Same content (or not loaded yet: the content is compared once it is).
    harmless.append(("data path", od["spec"], nd["spec"]))
  return changed, harmless


def _diff_text(diffs) -> str:
  return "; ".join(f"{n}: {o} -> {v}" for n, o, v in diffs)


def saved_run(mngr: ocp.CheckpointManager, workdir: str):
  """(step, settings, source) of the newest complete checkpoint of `mngr`
  (W/checkpoints of `workdir`); (None, None, None) without one. source:
  'checkpoint' or 'config.json' (an older workdir, or a step saved without
  settings: settings read from config.json + adjacency.json, None without
  them)."""
  step = latest_step(mngr)
  if step is None:
    return None, None, None
  settings = load_settings(mngr, step)
  if settings is not None:
    return step, settings, "checkpoint"
  return step, legacy_settings(workdir), "config.json"


def check_resume(workdir: str, saved: tuple, new: dict, log=None):
  """Compares the settings of a resume with those of the workdir's newest
  checkpoint, before any work.

  saved: `saved_run(...)` of the workdir, (step, settings, source).
  Harmless differences are written to `log` as one `note:` line (nothing
  when log is None).

  Raises:
    UserError: a difference that changes what is learned (one line listing
      each field, old -> new).
  """
  step, old, source = saved
  if step is None or old is None:
    return
  changed, harmless = compare_settings(old, new)
  where = (f"checkpoint step {step}" if source == "checkpoint"
           else f"{os.path.join(workdir, 'config.json')} (older workdir)")
  if changed:
    raise UserError(f"{workdir} holds a run (step {step}) with other settings "
                    f"({_diff_text(changed)}); resuming would mix them: use another "
                    "--workdir, or --restart to set the old run aside and start over")
  if harmless and log is not None:
    log(f"note: resuming {workdir} from step {step} with changed settings that do not change "
        f"what is learned ({_diff_text(harmless)}; saved ones from {where})")


def set_aside(workdir: str) -> str | None:
  """Moves a previous run's checkpoints, config and logs into
  W/previous-<UTC time>/ (nothing is deleted); returns that folder, or None
  when there was nothing to move."""
  names = ("checkpoints", "checkpoints.incomplete", "config.json", "adjacency.json",
           "metrics.csv", "tb")
  present = [n for n in names if os.path.exists(os.path.join(workdir, n))]
  if not present:
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  dest = os.path.join(workdir, f"previous-{stamp}")
  n = 1
  while os.path.exists(dest):
    dest, n = os.path.join(workdir, f"previous-{stamp}-{n}"), n + 1
  os.makedirs(dest)
  for name in present:
    os.replace(os.path.join(workdir, name), os.path.join(dest, name))
  return dest
