"""The library side of `run.py train` (and of the scripts that train the same
way): config from a preset and flags, a training run on a workdir from a
--data argument, resumable, with one-line errors before any work.
"""
from __future__ import annotations

import os

from scr_jax import checkpoint, config, dataset, structure, train, workdir as workdir_lib
from scr_jax.cliutil import log as _log
from scr_jax.errors import UserError

# Flags that are shorthands for `--set NAME=VALUE` (None: not given).
CONFIG_FLAGS = ("steps", "seed", "variant", "order", "q", "structure")


def make_config(preset: str, sets=(), log=_log, **flags) -> config.Config:
  """The preset, with `sets` ('key=value') and the CONFIG_FLAGS given as
  keywords applied; an ordering is checked; without VGG weights the
  perceptual loss is off (a note to `log`)."""
  sets = list(sets or [])
  for flag in CONFIG_FLAGS:
    val = flags.get(flag)
    if val is not None:
      sets.append(f"{flag}={val}")
  cfg = config.override(config.get_config(preset), sets)
  if cfg.order and cfg.order.lower() != "random":
    structure.check_order(cfg.order)
  return config.without_missing_vgg(cfg, log)


def data_spec(spec: str, cfg) -> str:
  """The --data argument as saved with a run: 'builtin:SIZE' or an absolute path."""
  return f"builtin:{cfg.image_size}" if spec == "builtin" else os.path.abspath(spec)


def check_data_arg(spec: str, flag: str = "--data"):
  """A --data folder that is missing or is a file: one line, before any work."""
  if spec == "builtin":
    return
  if not os.path.exists(spec):
    raise UserError(f"{flag} {spec}: not found (give a data folder, or builtin)")
  if not os.path.isdir(spec):
    raise UserError(f"{flag} {spec} is a file, not a folder: give the folder that holds the "
                    "images (or the root of a synface layout with train/ val/ test/)")


def candidate_orders(spec: str, cfg):
  """--candidates: 'all24' or a comma list of orderings (dense SCR only)."""
  orders = (list(structure.ALL_ORDERS) if spec == "all24"
            else [structure.check_order(o) for o in spec.split(",") if o])
  if cfg.variant not in ("independent", "dense") or not orders:
    raise UserError("--candidates takes all24 or a comma list of orderings (dense SCR)")
  return orders


def init_params_from(src, cfg, workdir: str, resume: bool, info: dict, log=_log):
  """--init-from W0: the parameters of W0's newest checkpoint (e.g. an
  `import-unsup3d` workdir) to start a new run from, with any structure;
  checked against the config's network shapes before any data is read.
  Records the source in info["init_from"]. None when src is None or the
  workdir already holds checkpoints to resume from."""
  if not src:
    return None
  if resume and checkpoint.has_checkpoints(workdir):
    log(f"note: {workdir} already holds checkpoints: resuming from them, --init-from "
        "is not used")
    return None
  r = workdir_lib.restore(src)
  if r.k:
    raise UserError(f"--init-from {src} holds {r.k} candidate structures; give a "
                    "single-structure workdir")
  shape = ("image_size", "embed_dim", "nf_encoder", "nf_ed", "nf_conf", "conf_zdim")
  diff = [f"{f}: {getattr(r.cfg, f)} -> {getattr(cfg, f)}" for f in shape
          if getattr(r.cfg, f) != getattr(cfg, f)]
  if diff:
    raise UserError(f"--init-from {src} has other network shapes ({'; '.join(diff)}); use its "
                    f"preset ({r.cfg.preset})")
  info["init_from"] = dict(workdir=os.path.abspath(src), step=r.step)
  log(f"note: starting from the parameters of {src} (step {r.step}) with a fresh optimiser")
  return r.params


def train_run(cfg, workdir: str, data: str = "builtin", *, candidates=None, resume=True,
              restart=False, max_seconds=None, init_from=None, log=_log, cache=None,
              workers=None) -> dict:
  """Trains cfg's structure (or the `candidates` orderings together) on the
  --data argument `data` in `workdir`, resumably; what `run.py train` does.

  Every check that can refuse (settings of a resume, an occupied workdir,
  --init-from shapes) runs before any data is read or anything compiled.
  Returns `train.fit`'s summary dict.

  Raises:
    UserError: see above; also a bad --data or --candidates.
  """
  st = structure.resolve_structure(cfg)
  check_data_arg(data)
  if candidates:  # K dense orderings trained together (vmapped), same batches and init
    st = structure.candidates(candidate_orders(candidates, cfg))
  checkpoint.probe_writable(workdir)
  resume = resume and not restart
  info = dict(data=data_spec(data, cfg))
  # Before any data is read or generated and before anything is compiled:
  # the requested settings against those of the workdir's newest checkpoint.
  used = checkpoint.has_checkpoints(workdir)
  if resume:
    checkpoint.check_resume(workdir, checkpoint.run_settings(
        cfg, st, data=dict(spec=info["data"])))
  elif used and not restart:
    step, _, _ = checkpoint.saved_run(workdir)
    raise UserError(f"{workdir} already holds a run (checkpoints up to step {step}); "
                    "--no-resume would overwrite it: add --restart to set it aside and start "
                    "over, or use another --workdir")
  init_params = init_params_from(init_from, cfg, workdir, resume, info, log)
  if restart and used:
    moved = checkpoint.set_aside(workdir)
    log(f"note: --restart: moved the previous run's checkpoints, config and logs to {moved}")
  notes = []  # a first-use prepare's note: said once the resume is known to go ahead
  train_data, val_data = dataset.load_train_data(data, cfg, cache, workers, notes)
  if resume:  # the same data? (its content, now that it is read; nothing compiled yet)
    info["fingerprint"] = dataset.fingerprint(train_data)
    checkpoint.check_resume(workdir, checkpoint.run_settings(
        cfg, st, data=dict(info["fingerprint"], spec=info["data"])))
  for note in notes:
    log(note)
  log(f"train: preset {cfg.preset}, variant {st.variant}, {dataset.num_images(train_data)} "
      f"images at {cfg.image_size}px, {cfg.steps} steps, batch {cfg.batch_size}")
  res = train.fit(cfg, workdir, train_data, val_data, st, resume=resume,
                  max_seconds=max_seconds, run_info=info, init_params=init_params)
  if res["reason"] != "already trained":
    log(f"trained to step {res['step']} in {res['seconds']:.0f}s ({res['reason']})")
  return res
