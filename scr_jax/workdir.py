"""A training workdir as a library object: what `fit` writes, what every
command reads back.

`Run` is a workdir opened once at a command boundary (`Run.open`: the lock
with its writability probe, the settings comparison of a resume, --restart)
or for reading (`Run.read`); it owns the workdir's one orbax
CheckpointManager, and `Run.save` writes each step as one composite commit.

Layout of W (written through a `Run` by `train.fit`, so by every producer:
`run.py train`, `search` (bo `evals/*`, unroll), `reproduce` (runs, table2,
fig6), import-unsup3d and the benchmark scripts):
  W/checkpoints/N/       one orbax step: items state {params, opt_state, step},
                         settings (config, structure, data:
                         `checkpoint.run_settings`) and data (iterator state)
  W/config.json          the config of the latest run (for people and `predict`)
  W/adjacency.json       the structure of the latest run (factors, variant, M, q, orders)
`restore(W)` rebuilds the model from the settings saved in the newest
checkpoint, candidates (a Kx4x4 stack) included.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax

from scr_jax import (checkpoint, lock, nets as nets_lib, structure as structure_lib,
                     train_step)
from scr_jax.cliutil import log as _log
from scr_jax.config import Config
from scr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained model read back from a workdir.

  cfg: the config saved with the checkpoint.
  structure: the Structure trained (m 4x4, or Kx4x4 with `orders` for a
    candidates workdir).
  params: flax params (with a leading K axis for candidates).
  step: the checkpoint's step.
  nets: the flax module built from cfg.
  settings: the checkpoint's saved settings (config, structure, data, ...).
  """
  cfg: Config
  structure: structure_lib.Structure
  params: Any
  step: int
  nets: Any
  settings: dict

  @property
  def k(self) -> int:
    return self.structure.k

  def candidate(self, which) -> "Restored":
    """One candidate of a candidates workdir (index, or its ordering label)."""
    i = candidate_index(self.structure, which)
    return dataclasses.replace(self, structure=self.structure.candidate(i),
                               params=train_step.unstack_params(self.params, i))

  def single(self, workdir: str, what: str, which=None) -> "Restored":
    """This model as a single structure: itself, or the candidate `which`.

    Raises:
      UserError: a candidates workdir and no (valid) candidate given.
    """
    if which is not None and not self.k:
      raise UserError(f"{workdir} holds a single structure; --candidate is for workdirs of "
                      "candidates (train --candidates, search evals, fig6)")
    if self.k and which is None:
      raise UserError(f"{workdir} holds {self.k} candidate structures "
                      f"({', '.join(self.structure.orders or ())}); {what} needs one: add "
                      "--candidate ORDER (or its index)")
    return self.candidate(which) if self.k else self


def _silent(msg: str):
  del msg


class Run:
  """One workdir's run: its one orbax CheckpointManager, the newest complete
  checkpoint found when it was opened (`step`, `saved_settings`), and the
  settings this run saves with each step (`settings`: `checkpoint.run_settings`
  of `cfg`, `structure`, data, plus provenance such as init_from).

  Open it once per command (`Run.open`, as a context manager: it holds the
  workdir's lock) or read one (`Run.read`); `train.fit(run, ...)` trains it.
  """

  def __init__(self, workdir: str, log=_silent):
    self.workdir = workdir
    self.log = log
    self.cfg: Config | None = None
    self.structure: structure_lib.Structure | None = None
    self.resume = False  # the state continues the newest checkpoint
    self.overwrite = False  # a producer replacing a step at its own step number
    self.describe = True  # also write W/config.json (W/adjacency.json always)
    self._data, self._extra = {}, {}
    self._mngr = None
    self._stack = contextlib.ExitStack()
    self._notes = set()
    # What the workdir holds: (step, settings, source) of its newest complete
    # checkpoint (`checkpoint.saved_run`); (None, None, None) for none.
    self.saved = (None, None, None)

  # --------------------------------------------------------------------------
  # Opening.
  # --------------------------------------------------------------------------

  @classmethod
  def read(cls, workdir: str) -> "Run":
    """The run of an existing workdir, for reading (no lock, nothing written;
    W/checkpoints is not created when missing).

    Raises:
      UserError: the newest checkpoint's settings cannot be read.
    """
    run = cls(workdir)
    if checkpoint.has_checkpoints(workdir):
      run.saved = checkpoint.saved_run(run.mngr, workdir)
    return run

  @classmethod
  def open(cls, workdir: str, cfg: Config, structure: structure_lib.Structure, data=None, *,
           resume: bool = True, restart: bool = False, overwrite: bool = False, extra=None,
           describe: bool = True, log=_log) -> "Run":
    """Opens workdir W for this run, once, before any data is read or anything
    compiled: takes W's lock (`lock.hold`, which probes that W is writable),
    reads its newest checkpoint and then, exactly once:
      * resume: compares the requested settings with the saved ones
        (`checkpoint.check_resume`: harmless differences are one note to `log`);
        a `depth_prior_ellipse="fit"` takes the ellipse the run was started with,
        an unresolved `init_choice` the initialisation its trials chose;
      * restart (not resume): sets the previous run aside (`checkpoint.set_aside`);
      * neither: refuses a W that holds checkpoints, unless `overwrite` (a
        producer writing one finished state, e.g. search unroll: a step at the
        same number is replaced).
    Use it as a context manager: the lock is held until the block ends.

    Args:
      cfg: the resolved config; structure: the Structure trained (M 4x4 or Kx4x4).
      data: as `checkpoint.run_settings` (spec and/or a data fingerprint;
        `update(data=...)` adds the content once it is read).
      extra: more provenance saved with the settings (init_from, imported_from...).
      describe: `write_files` also writes W/config.json (else only adjacency.json).
      log: notes (None: silent).
    Raises:
      UserError: W is not writable or in use by another job, the resume would
        change what is learned, or W holds checkpoints and neither resume,
        restart nor overwrite was asked.
    """
    run = cls(workdir, log or _silent)
    # (the lock's own notes, a stale lock taken over, are said even when quiet)
    run._stack.enter_context(lock.hold(workdir, log) if log else lock.hold(workdir))
    try:
      run._begin(cfg, structure, data, resume and not restart, restart, overwrite, extra,
                 describe)
    except BaseException:
      run.close()
      raise
    return run

  def _begin(self, cfg, st, data, resume, restart, overwrite, extra, describe):
    # (cfg first: the manager keeps cfg.keep_checkpoints steps)
    self.cfg, self.structure, self.overwrite, self.describe = cfg, st, overwrite, describe
    self._data, self._extra = dict(data or {}), dict(extra or {})
    if restart:  # nothing of the previous run is read: it is moved away whole
      if checkpoint.has_checkpoints(self.workdir):
        moved = checkpoint.set_aside(self.workdir)
        if moved:
          self.log(f"note: --restart: moved the previous run's checkpoints, config and logs "
                   f"to {moved}")
    elif checkpoint.has_checkpoints(self.workdir):
      self.saved = checkpoint.saved_run(self.mngr, self.workdir)
    old = self.saved_settings
    if resume and old and cfg.depth_prior_ellipse.strip() == "fit":
      # A resumed "fit" prior is compared as the numbers it was fitted to.
      fitted = str(old.get("config", {}).get("depth_prior_ellipse", "fit"))
      if fitted.strip() != "fit":
        cfg = dataclasses.replace(cfg, depth_prior_ellipse=fitted)
    if resume and old and cfg.trials_wanted():
      # Likewise the initialisation the run's trials chose (scr_jax/init_trials.py).
      chosen = int(old.get("config", {}).get("init_choice", -1))
      if chosen >= 0:
        cfg = dataclasses.replace(cfg, init_choice=chosen)
        if cfg.init_trial_depth_warmup == "both":  # and whether it kept the depth warm-up
          saved = Config.from_json(json.dumps(old["config"])).warmup.depth_steps
          cfg = dataclasses.replace(cfg, warmup=dataclasses.replace(cfg.warmup,
                                                                    depth_steps=saved))
    self.cfg, self.resume = cfg, resume
    if resume:
      self._check()
    elif self.step is not None and not overwrite:
      raise UserError(f"{self.workdir} already holds checkpoints (up to step {self.step}); "
                      "starting over (--no-resume) would overwrite them: add --restart to set "
                      "them aside and start over, or use another --workdir")

  def _check(self):
    """The requested settings against the saved ones (the only comparison of a
    resume). Its note on harmless differences waits for the data's content
    (`update(data=...)`): a resume refused for other images says only that."""
    known = "hash" in self._data
    checkpoint.check_resume(self.workdir, self.saved, self.settings,
                            log=self._note if known else None)

  def _note(self, msg: str):
    if msg not in self._notes:  # said once, though checked again with the data's content
      self._notes.add(msg)
      self.log(msg)

  def update(self, cfg: Config | None = None, data=None, extra=None):
    """Adds what becomes known after opening: the config with a prior fitted to
    the data, the data's fingerprint (`dataset.fingerprint`), provenance. A
    resume is compared again (the data's content, now that it is read).

    Raises:
      UserError: as `open` (the data's content differs from the saved run's).
    """
    if cfg is not None:
      self.cfg = cfg
    self._data.update(data or {})
    self._extra.update(extra or {})
    if self.resume:
      self._check()

  def close(self):
    self._stack.close()

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exc):
    self.close()

  # --------------------------------------------------------------------------
  # What the workdir holds.
  # --------------------------------------------------------------------------

  @property
  def mngr(self):
    """The run's one orbax CheckpointManager (made, with W/checkpoints, on first use)."""
    if self._mngr is None:
      keep = self.cfg.keep_checkpoints if self.cfg is not None else 3
      self._mngr = checkpoint.manager(self.workdir, keep)
    return self._mngr

  @property
  def step(self):
    """The newest complete checkpoint's step when opened (None: none)."""
    return self.saved[0]

  @property
  def saved_settings(self):
    """That checkpoint's settings (None: none, or an older workdir without config.json)."""
    return self.saved[1]

  @property
  def settings(self) -> dict:
    """The settings saved with this run's steps."""
    s = checkpoint.run_settings(self.cfg, self.structure, self._data)
    s.update(self._extra)
    return s

  @property
  def data_info(self) -> dict:
    return dict(self._data)

  def restore(self, like_tree, hint=None):
    """The newest checkpoint's state tree in the structure of `like_tree`
    (`checkpoint.restore_step`); None when the run does not resume one.

    Raises:
      UserError: the checkpoint does not fit `like_tree`.
    """
    if not self.resume or self.step is None:
      return None
    kw = {} if hint is None else dict(hint=hint)
    return checkpoint.restore_step(self.mngr, self.step, like_tree, **kw)

  def data_state(self, step: int):
    """The data iterator state saved with step `step` (None: none)."""
    return checkpoint.load_data_state(self.mngr, step)

  def latest_step(self):
    """The newest step this run's manager knows (saved now or before)."""
    return self.mngr.latest_step()

  # --------------------------------------------------------------------------
  # Writing.
  # --------------------------------------------------------------------------

  def check_free_space(self, state_tree):
    checkpoint.check_free_space(self.workdir, state_tree, self.cfg.keep_checkpoints)

  def write_files(self):
    """W/config.json (when `describe`) and W/adjacency.json of this run's
    settings (process 0)."""
    if jax.process_index() != 0:
      return
    settings = self.settings
    if self.describe:
      checkpoint.save_run_files(self.workdir, settings)
    else:
      checkpoint.save_adjacency(self.workdir, settings["structure"])

  def save(self, state, data_state=None) -> int:
    """Saves `state` (a train_step.TrainState) at its step with this run's
    settings and `data_state` as one orbax commit (`checkpoint.save`).
    Returns the step.

    Raises:
      UserError: the write failed (one line naming the last complete checkpoint).
    """
    tree = state.tree()
    if self.overwrite:
      step = int(jax.device_get(tree["step"]))
      if step in self.mngr.all_steps():
        self.mngr.delete(step)
    return checkpoint.save(self.mngr, tree, self.settings, data_state)


def candidate_index(st: structure_lib.Structure, which) -> int:
  """Index of candidate `which` (an int, a digit string or an ordering label).

  Raises:
    UserError: no such candidate.
  """
  labels = list(st.orders or [])
  if isinstance(which, int) or str(which).isdigit():
    i = int(which)
    if not 0 <= i < st.k:
      raise UserError(f"--candidate {which}: the workdir holds candidates 0..{st.k - 1}")
    return i
  name = str(which)
  name = name if name == "independent" else name.upper()
  if name not in labels:
    raise UserError(f"--candidate {which}: not among the workdir's candidates "
                    f"({', '.join(labels)})")
  return labels.index(name)


def load_config(workdir: str) -> Config:
  """The config of the newest checkpoint's settings, without reading any
  weights (sizes and crop before the inputs are read); W/config.json for a
  workdir without checkpoints or settings.

  Raises:
    UserError: neither is there.
  """
  if os.path.isdir(workdir):
    settings = Run.read(workdir).saved_settings
    if settings is not None:
      return checkpoint.settings_config(settings)
  return checkpoint.load_config(workdir)


def restore(workdir: str) -> Restored:
  """The newest checkpoint of a trained workdir, with the model built from the
  settings saved in that checkpoint (not from a config.json written later).
  Workdirs made before settings were saved per checkpoint fall back to
  config.json and adjacency.json, with a note.

  Raises:
    UserError: no such folder, no checkpoint, no settings, or a checkpoint that
      does not fit its settings.
  """
  if not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir}: not found")
  run = Run.read(workdir)
  step, settings, source = run.saved
  if step is None:
    raise UserError(f"{workdir} has no checkpoint yet (train first)")
  if source != "checkpoint":
    if settings is None:
      raise UserError(f"{workdir}: checkpoint step {step} has no saved settings and there is no "
                      "config.json + adjacency.json beside it; is it a training workdir?")
    _log(f"note: checkpoint step {step} of {workdir} was saved without its settings (an older "
         "workdir, or a save cut short); using its config.json and adjacency.json")
  cfg = checkpoint.settings_config(settings)
  st = structure_lib.Structure.from_record(settings["structure"])
  nets = nets_lib.make_nets(cfg)
  k = st.k

  def like():  # shapes only: initialising the paper nets eagerly takes ~30 s on CPU
    state = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))[1]
    return train_step.stack_state(state, k) if k else state

  # Shapes only: restored onto this machine's devices, whatever the saving one had.
  restored = checkpoint.restore_step(
      run.mngr, step, jax.eval_shape(lambda: like().tree()),
      hint="it does not match the settings saved with it (a workdir edited by hand, or made "
           "by another version?); move that step folder away to use an earlier one")
  return Restored(cfg=cfg, structure=st, params=restored["params"],
                  step=int(restored["step"]), nets=nets, settings=settings)


def save(workdir: str, cfg: Config, structure: structure_lib.Structure, state: dict,
         data=None, extra=None, describe: bool = True) -> dict:
  """Writes a trained state as workdir W's checkpoint (at its step),
  for producers that train outside `train.fit` (search unroll, import-unsup3d):
  afterwards `restore(W)` (eval, predict, diagnose, train --init-from) reads it.

  state: a train_step.TrainState with this config's network shapes (a
    leading K axis when structure is a stack).
  data: as `checkpoint.run_settings` (spec and/or a data fingerprint).
  extra: more provenance merged into the saved settings (e.g. imported_from).
  describe: also (re)write W/config.json; W/adjacency.json is always written.
  A checkpoint already at that step (a rerun) is replaced.
  Returns the saved settings.
  """
  with Run.open(workdir, cfg, structure, data, resume=False, overwrite=True, extra=extra,
                describe=describe) as run:
    run.save(state)
    run.write_files()
    return run.settings
