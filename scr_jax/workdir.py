"""A training workdir as a library object: what `fit` writes, what every
command reads back.

Layout of W (written by `train.fit`, so by every producer: `run.py train`,
`search` (bo `evals/*`, unroll), `reproduce` (runs, table2, fig6) and the
benchmark scripts):
  W/checkpoints/N/       orbax state {params, opt_state, step} + scr_settings.json
                         (config, structure, data: `checkpoint.run_settings`)
  W/config.json          the config of the latest run (for people and `predict`)
  W/adjacency.json       the structure of the latest run (factors, variant, M, q, orders)
`restore(W)` rebuilds the model from the settings saved in the newest
checkpoint, candidates (a Kx4x4 stack) included.
"""
from __future__ import annotations

import dataclasses
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
    _, settings, _ = checkpoint.saved_run(workdir)
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
  # (manager() creates W/checkpoints: only for a folder that has one already)
  mngr = checkpoint.manager(workdir) if checkpoint.has_checkpoints(workdir) else None
  step = checkpoint.latest_step(mngr) if mngr else None
  if step is None:
    raise UserError(f"{workdir} has no checkpoint yet (train first)")
  settings = checkpoint.load_settings(workdir, step)
  if settings is None:
    settings = checkpoint.legacy_settings(workdir)
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
      mngr, step, jax.eval_shape(lambda: like().tree()),
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
  settings = checkpoint.run_settings(cfg, structure, data)
  settings.update(extra or {})
  checkpoint.probe_writable(workdir)
  with lock.hold(workdir):
    mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
    step = int(jax.device_get(state.step))
    if step in mngr.all_steps():
      mngr.delete(step)
    checkpoint.save(mngr, state.tree(), settings)
    if describe:
      checkpoint.save_run_files(workdir, settings)
    else:
      checkpoint.save_adjacency(workdir, settings["structure"])
  return settings
