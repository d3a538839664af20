"""The training loop: `fit` (data order, checkpoints, logging, signals,
validation), resumable.

The step itself is `scr_jax.train_step`, devices and processes
`scr_jax.parallel`, batched inference `scr_jax.evaluator`.
"""
from __future__ import annotations

import contextlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import (config as config_lib, dataset, diagnostics, init_trials, model, parallel,
                     runlog, structure as structure_lib, train_step, workdir as workdir_lib)
from scr_jax.cliutil import log as _log
from scr_jax.errors import NonFiniteError, StopRequested, UserError
from scr_jax.evaluator import Evaluator, each_candidate
from scr_jax.parallel import (any_process, barrier, compile_in_step, data_mesh, place_candidates,
                              replicate, shard_local_batch)
from scr_jax.train_step import (init_state, make_candidate_step, make_train_step, new_state,
                                stack_state)


# ----------------------------------------------------------------------------
# The loop: data order, sharding, checkpoints, logging, signals.
# ----------------------------------------------------------------------------

# The data order (a pure function of seed and step) lives with the loader.
batch_indices = dataset.batch_indices


class _Signals:
  """Turns SIGINT/SIGTERM into a flag the loop polls after each step."""

  def __init__(self):
    self.received = None

  def __enter__(self):
    self._old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handler(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def resolve_prior_ellipse(cfg, train_data=None, log=None):
  """cfg with `depth_prior_ellipse="fit"` resolved: with train_data,
  `model.fit_prior_ellipse` of a sample of its images (told to `log`);
  without, cfg unchanged. (A resume keeps the ellipse the run was started
  with: `workdir.Run.open` puts it into the run's config.)"""
  if cfg.depth_prior_ellipse.strip() != "fit" or train_data is None:
    return cfg
  ell = model.fit_prior_ellipse(dataset.sample_images(train_data))
  if log is not None:
    log(f"note: depth prior ellipse fitted to the training images' mean silhouette: "
        f"a={ell[0]:g}, b={ell[1]:g}, cy={ell[3]:+g} (saved with the run)")
  return config_lib.override(cfg, ["depth_prior_ellipse=" + ",".join(f"{v:g}" for v in ell)])


def fit_workdir(cfg, workdir: str, train_data: dict, val_data=None, structure=None,
                resume: bool = True, quiet: bool = False, max_seconds=None, log=None,
                run_info=None, init_params=None, objective=None):
  """`fit` on workdir W opened for this run (`workdir.Run.open`), for the
  library's producers that train a config directly (search evaluations,
  reproduce, the benchmarks, tests).

  structure: the `structure.Structure` to train (default: the config's,
  `structure.resolve_structure(cfg)`); a stack Kx4x4 (`structure.candidates`)
  trains K candidate structures at once.
  resume: continue W's newest checkpoint (its settings compared first);
  False refuses a W that holds checkpoints.
  run_info: optional dict(data=the --data argument, fingerprint=
  dataset.fingerprint(train data) if already computed, init_from=provenance
  of init_params), saved with the settings.
  Returns `fit`'s summary dict of a run that ended (its steps done, or
  `max_seconds` spent).

  Raises:
    UserError: as `workdir.Run.open` and `fit`.
    StopRequested: SIGINT / SIGTERM arrived; the checkpoint is saved, and the
      caller must not take the unfinished run for a result (`fit` itself
      returns, for the CLI's train, which reports and exits).
  """
  parallel.check_batch_size(cfg.batch_size)
  st = structure_lib.resolve_structure(cfg) if structure is None else structure
  info = dict(run_info or {})
  data = dict(info.get("fingerprint") or {})
  if info.get("data"):
    data["spec"] = info["data"]
  extra = dict(init_from=info["init_from"]) if info.get("init_from") else None
  with workdir_lib.Run.open(workdir, cfg, st, data, resume=resume, extra=extra,
                            log=None if quiet else _log) as run:
    res = fit(run, train_data, val_data, quiet=quiet, max_seconds=max_seconds, log=log,
              init_params=init_params, objective=objective)
  if res["reason"] in ("SIGINT", "SIGTERM"):
    raise StopRequested(res["reason"], res["step"], workdir)
  return res


def fit(run, train_data: dict, val_data=None, quiet: bool = False, max_seconds=None, log=None,
        init_params=None, objective=None):
  """Trains the opened `run` (`workdir.Run.open`: config, structure, resume
  decided there) for `run.cfg.steps` steps (or until `max_seconds`).

  Its structure's M is the adjacency (4x4) or, with q, the dense mask of
  dynamic SCR; a stack Kx4x4 (`structure.candidates`) trains K candidate
  structures at once (vmapped, same batches, same initial parameters), with
  state params/opt_state carrying the K axis.
  At each validation, SIDE / MAD on val_data and, when val_data carries the
  generator's ground truth (val_data["gt"], see data.load_gt), the
  diagnostics of scr_jax/diagnostics.py go to tensorboard and metrics.csv
  (prefix val/).
  init_params: start from these parameters (e.g. a pretrained or imported
  model; same shapes as this config's) with a fresh optimiser, unless the
  run resumes a checkpoint.
  objective: None (SCR's loss), or objective(params, batch, structure, step)
  -> (loss, metrics with "loss"), trained on the same batches by the same
  optimiser and step (`train_step.make_train_step`), e.g. reproduce's
  supervised upper bound; a single structure only, and val_data=None
  (validation evaluates the SCR model).
  Each checkpoint is `run.save(state, data_state)`: the state with the run's
  settings (config, structure, a fingerprint of the training images, added
  here if the run has none yet) in one commit; W/config.json +
  W/adjacency.json describe the run, so any workdir `fit` makes is read back
  by `workdir.restore` (eval, predict, diagnose). A run already at
  `cfg.steps` is left untouched.
  Returns a summary dict (step, start_step, seconds, reason, last metrics,
  state, nets, structure, cfg: the config trained, `depth_prior_ellipse="fit"`
  resolved by `resolve_prior_ellipse`).

  Raises:
    UserError: the data's content differs from the resumed run's, initial
      parameters of other shapes, a batch that does not divide over the devices.
    NonFiniteError: a non-finite step with on_nonfinite="stop".
  """
  workdir = run.workdir
  parallel.check_batch_size(run.cfg.batch_size)
  if "hash" not in run.data_info:
    run.update(data=dataset.fingerprint(train_data))  # compared on a resume
  if run.cfg.depth_prior_ellipse.strip() == "fit":
    run.update(cfg=resolve_prior_ellipse(run.cfg, train_data, None if quiet else _log))
  mesh = data_mesh()
  trial_state = None
  if run.cfg.trials_wanted():  # (a resume has the saved choice)
    if init_params is not None:
      raise UserError("init trials choose the initial parameters themselves: they cannot start "
                      "from given ones (--init-from); set init_trials=1, "
                      "init_trial_depth_warmup=same")
    chosen, trial_state = init_trials.resolve_init(run.cfg, train_data, run.structure,
                                                   None if quiet else _log)
    run.update(cfg=chosen)
  cfg, st = run.cfg, run.structure
  k = st.k
  if objective is not None and (k or val_data is not None):
    raise ValueError("fit(objective=...) trains a single structure without validation")
  st_dev = st.replace(m=jnp.asarray(st.m, jnp.float32))  # placed on the mesh below
  nets, state = init_state(cfg, train_step.init_key(cfg))
  if init_params is not None:
    like = jax.tree_util.tree_map(jnp.shape, state.params)
    if jax.tree_util.tree_map(jnp.shape, init_params) != like:
      raise UserError("the initial parameters do not have this config's network shapes")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), init_params)
    state = new_state(nets, cfg, params)
  if k:
    state = stack_state(state, k)
  restored = run.restore(state.tree())
  if restored is not None:
    state = state.with_tree(restored)
  elif trial_state is not None and int(trial_state.step) < cfg.steps:
    state = trial_state  # the trial's winner, trained on the run's first batches
  start = int(jax.device_get(state.step))
  if start >= cfg.steps and (start or run.step is not None):
    # Nothing to train: nothing is written (config, logs, checkpoints).
    if not quiet:
      _log(f"note: {workdir} is already at step {start} (steps={cfg.steps}); nothing trained, "
           "nothing written")
    return dict(step=start, start_step=start, seconds=0.0, reason="already trained", last={},
                state=state, nets=nets, structure=st, cfg=cfg)
  run.check_free_space(state.tree())
  run.write_files()
  barrier("fit-start")
  put_batch = lambda x: shard_local_batch(x, mesh)
  shard = (jax.process_index(), jax.process_count())
  if k:
    state, st_dev, by_candidate = place_candidates(state, st_dev, mesh)
    if by_candidate:  # every device needs the whole batch
      put_batch, shard = (lambda x: replicate(x, mesh)), (0, 1)
    step_fn = make_candidate_step(nets, cfg)
  else:
    state = replicate(state, mesh)
    st_dev = replicate(st_dev, mesh)
    step_fn = make_train_step(nets, cfg, objective)
  # The batches of steps [start, steps): grain, its state saved with each checkpoint.
  batches = dataset.Batches(train_data, cfg.batch_size, cfg.seed, start, cfg.steps, shard=shard,
                            state=run.data_state(start) if start else None)
  first = next(batches)
  step_fn = compile_in_step(step_fn, state, put_batch(first), st_dev)
  evaluator = Evaluator(nets, cfg) if val_data is not None else None
  log = log or runlog.RunLog(workdir, cfg.steps, cfg.batch_size * max(k, 1), quiet=quiet)
  t0 = time.time()
  reason, last = "done", {}
  if start and not quiet:
    print(f"resuming {workdir} from step {start}" if restored is not None else
          f"continuing the init trials' winner from step {start}", flush=True)
  with _Signals() as sig, contextlib.closing(batches):
    step = start
    while step < cfg.steps:
      x, first = (first if first is not None else next(batches)), None
      state, met = step_fn(state, put_batch(x), st_dev)
      step += 1
      if not bool(np.all(jax.device_get(met["finite"]))):
        if cfg.on_nonfinite == "stop":
          good = run.latest_step()
          try:
            log.close()
          except OSError:
            pass
          raise NonFiniteError(
              f"non-finite loss/gradient at step {step}; training stopped, the last "
              f"good checkpoint is {'none yet' if good is None else f'step {good}'} in {workdir}")
        log.scalars(step, {"skipped_nonfinite": 1.0})
      if step % cfg.log_every == 0 or step == cfg.steps:
        # Candidates: the mean over K is logged (per-candidate values in val).
        last = {n: float(np.mean(v)) for n, v in jax.device_get(met).items()}
        log.scalars(step, last)
        log.progress(step, last["loss"])
      if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
        for i, (params_i, st_i) in enumerate(each_candidate(state.params, st_dev)):
          summ, _, _ = evaluator.evaluate(params_i, val_data, st_i, limit=cfg.num_eval_images)
          values, line = dict(summ), ""
          if val_data.get("gt") is not None:  # generated data: what each factor learned
            diag = diagnostics.evaluate(nets, params_i, val_data, st_i, cfg,
                                        limit=cfg.num_eval_images)
            values.update(diag)
            line = "\n    " + diagnostics.headline(diag)
          log.scalars(step, values, prefix=f"val_c{i:02d}" if k else "val")
          if not quiet:
            who = f" candidate {i}" if k else ""
            _log(f"  val @ {step}{who}: SIDE {summ['side_mean']:.3f} x1e-2  "
                 f"MAD {summ['mad_mean']:.2f} deg{line}")
      if step % cfg.ckpt_every == 0:
        run.save(state, batches.state())
      # Several processes must leave the loop at the same step (collectives).
      over = max_seconds is not None and time.time() - t0 > max_seconds
      if any_process(bool(sig.received) or over):
        reason = sig.received or ("time budget" if over else "stop on another process")
        break
  if run.latest_step() != step:
    run.save(state, batches.state())
  log.close()
  if reason in ("SIGINT", "SIGTERM") and not quiet:
    _log(f"{reason}: saved checkpoint at step {step} in {workdir}; rerun to resume")
  return dict(step=step, start_step=start, seconds=time.time() - t0, reason=reason,
              last=last, state=state, nets=nets, structure=st, cfg=cfg)
