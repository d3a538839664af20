"""Training: pure jit-compiled step, optimiser, state init.

`train_step(state, batch_img, m) -> (state, metrics)` is pure; state is a
dict of arrays (params, opt_state, step) so it checkpoints as a plain pytree.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scr_jax import dataset, losses, model, nets as nets_lib, structure as structure_lib
from scr_jax.errors import NonFiniteError, UserError


WARMUP_FIELDS = ("conf_warmup_steps", "sym_warmup_steps", "trans_warmup_steps",
                 "tilt_warmup_steps", "depth_warmup_steps")


def uses_warmups(cfg) -> bool:
  return any(getattr(cfg, f) > 0 for f in WARMUP_FIELDS)


def decay_where_trained(weight_decay: float) -> optax.GradientTransformation:
  """Coupled L2 (g + wd * p) only on the elements whose loss gradient is not
  exactly 0 this step.

  Why: Adam normalises the update, so a parameter that the loss does not see
  (a warm-up that scales a network's output by 0 cuts its gradient) would be
  moved by about lr per step towards 0 by the weight decay alone: 300 steps
  at lr 5e-4 erased the whole depth encoder (kernels down to 1e-14, its
  embedding constant over images, canonical depth one template forever).
  With this rule such a parameter stays where it is until the loss sees it.
  """
  def update(grads, state, params):
    if params is None:
      raise ValueError("decay_where_trained needs params")
    return jax.tree_util.tree_map(
        lambda g, p: g + weight_decay * p * (g != 0).astype(p.dtype), grads, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg):
  # Unsup3D: Adam with weight decay added to the gradient (coupled L2). With
  # warm-ups on, the decay skips the parameters a warm-up cuts off (see
  # decay_where_trained); without them (paper) it is exactly Unsup3D's.
  decay = (decay_where_trained(cfg.weight_decay) if uses_warmups(cfg)
           else optax.add_decayed_weights(cfg.weight_decay))
  parts = [decay, optax.adam(cfg.lr, b1=0.9, b2=0.999)]
  if cfg.lr_view_mult != 1.0:  # only then: the optimiser state keeps Unsup3D's shape
    is_view = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[1], "key", None) in ("f1_V", "f2_V"), params)
    parts.append(optax.masked(optax.scale(cfg.lr_view_mult), is_view))
  return optax.chain(*parts)


def init_state(cfg, rng):
  """Returns (nets module, state dict)."""
  nets = nets_lib.make_nets(cfg)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  params = nets.init(rng, x)
  params = _flat_initial_depth(params)
  opt = make_optimizer(cfg)
  state = dict(params=params, opt_state=opt.init(params), step=jnp.zeros((), jnp.int32))
  return nets, state


def _flat_initial_depth(params):
  """Zero the depth decoder's last conv: training starts from a flat canonical
  depth, so early random views do not stretch the mesh into huge faces."""
  p = jax.tree_util.tree_map(lambda x: x, params)  # copy the containers
  dec = p["params"]["f2_D"]
  last = sorted((k for k in dec if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))[-1]
  dec[last]["kernel"] = jnp.zeros_like(dec[last]["kernel"])
  return p


def _warmup(n: int, step):
  """1 for the first half of an n-step warm-up, then linearly down to 0;
  None when off (n = 0) or outside training (step None)."""
  if step is None or n <= 0:
    return None
  return jnp.clip((n - step) / (n / 2), 0.0, 1.0)


def sym_weight(cfg, step):
  """Weight of the symmetry warm-up at `step` (Config.sym_warmup_steps)."""
  return _warmup(cfg.sym_warmup_steps, step)


def trans_scale(cfg, step):
  """Scale of the view translation at `step` (Config.trans_warmup_steps):
  0 during the first half of the warm-up, then up to 1; None when off."""
  w = _warmup(cfg.trans_warmup_steps, step)
  return None if w is None else 1.0 - w


def tilt_scale(cfg, step):
  """Scale of the view's pitch and roll at `step` (Config.tilt_warmup_steps)."""
  w = _warmup(cfg.tilt_warmup_steps, step)
  return None if w is None else 1.0 - w


def depth_scale(cfg, step):
  """Scale of the depth net's output at `step` (Config.depth_warmup_steps)."""
  w = _warmup(cfg.depth_warmup_steps, step)
  return None if w is None else 1.0 - w


def loss_fn(params, nets, img, m, cfg, q=None, perceptual_fn=None, step=None):
  out = model.forward(nets, params, img, m, cfg, q, sym_weight(cfg, step),
                      trans_scale(cfg, step), tilt_scale(cfg, step), depth_scale(cfg, step))
  return losses.total_loss(out, img, cfg, perceptual_fn, step)


def perceptual_for(cfg):
  """The perceptual-loss function when the config asks for one (else None)."""
  if cfg.lam_perc > 0 and cfg.vgg_weights:
    from scr_jax import perceptual
    return perceptual.make_perceptual_fn(perceptual.load_vgg(cfg.vgg_weights))
  return None


def _train_step_fn(nets, cfg, q=None):
  """The un-jitted step(state, img_BxSxSx3, m) -> (state, metrics)."""
  opt = make_optimizer(cfg)
  perc = perceptual_for(cfg)

  def step(state, img, m):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], nets, img, m, cfg, q, perc, state["step"])
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    # A non-finite step leaves params and optimiser state untouched; the host
    # then stops (keeping the last good checkpoint) or skips the batch.
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = dict(metrics, grad_norm=gnorm, finite=finite)
    new = dict(params=keep(params, state["params"]),
               opt_state=keep(opt_state, state["opt_state"]),
               step=state["step"] + 1)
    return new, metrics

  return step


@functools.lru_cache(maxsize=16)  # same (nets, cfg, q) -> same jitted fn, no recompile
def make_train_step(nets, cfg, q=None):
  """Returns train_step(state, img_BxSxSx3, m) -> (state, metrics), jitted."""
  return jax.jit(_train_step_fn(nets, cfg, q), donate_argnums=0)


# Stacked candidates: params and optimiser state carry a leading K axis, the
# step counter stays a scalar (all candidates advance together).
_STACK_AXES = dict(params=0, opt_state=0, step=None)


def stack_state(state, k: int):
  """K copies of one initial state (same init: candidates differ only in M)."""
  tile = lambda x: jnp.broadcast_to(x, (k,) + x.shape)
  return dict(params=jax.tree_util.tree_map(tile, state["params"]),
              opt_state=jax.tree_util.tree_map(tile, state["opt_state"]),
              step=jnp.array(state["step"]))  # a copy: the step donates its input


def unstack_params(params_K, i: int):
  return jax.tree_util.tree_map(lambda x: x[i], params_K)


@functools.lru_cache(maxsize=16)
def make_candidate_step(nets, cfg, q=None):
  """K candidate structures in one compiled step: jax.vmap of the train step
  over (params, opt_state, m_Kx4x4), the same image batch for all candidates.
  Returns step(state_K, img_BxSxSx3, m_Kx4x4) -> (state_K, metrics_K).

  `nets.conv2d` batches per-candidate kernels as batched matmuls (small
  layers) or one plain conv per candidate (on CPU), not as grouped convs, so
  K candidates cost about K single steps (experiments/bench_candidates.py;
  the unrolled candidate loop makes the first compile slow at large K).
  """
  step = jax.vmap(_train_step_fn(nets, cfg, q), in_axes=(_STACK_AXES, None, 0),
                  out_axes=(_STACK_AXES, 0))
  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def make_val_loss_fn(nets, cfg, q=None, stacked=False):
  """(params, img, m) -> photometric loss (the objective of structure search);
  with stacked=True, vmapped over K candidates (params_K, m_Kx4x4)."""
  def fn(params, img, m):
    return loss_fn(params, nets, img, m, cfg, q)[0]
  return jax.jit(jax.vmap(fn, in_axes=(0, None, 0)) if stacked else fn)


def val_loss(fn, params, images_NxSxSx3, m, batch_size: int, limit=None):
  """Mean loss over the first `limit` images, in full batches (the remainder
  that does not fill a batch is left out so every batch has the same shape)."""
  n = images_NxSxSx3.shape[0] if limit is None else min(limit, images_NxSxSx3.shape[0])
  nb = max(n // batch_size, 1)
  tot = 0.0
  for i in range(nb):
    chunk = images_NxSxSx3[i * batch_size:(i + 1) * batch_size]
    if chunk.shape[0] < batch_size:
      chunk = np.resize(chunk, (batch_size,) + chunk.shape[1:])
    tot = tot + np.asarray(fn(params, jnp.asarray(chunk), m))
  return tot / nb


# ----------------------------------------------------------------------------
# The loop: data order, sharding, checkpoints, logging, signals.
# ----------------------------------------------------------------------------

# The data order (a pure function of seed and step) lives with the loader.
batch_indices = dataset.batch_indices


def data_mesh():
  """1-D mesh over all devices (local and, after jax.distributed, remote)."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


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
  return compiled


class StopRequested(Exception):
  """Raised inside the loop after SIGINT/SIGTERM, once a checkpoint is saved."""


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


@functools.lru_cache(maxsize=16)
def make_eval_fn(nets, cfg, q=None):
  """(params, img, m) -> (depth in the input view, prediction-valid mask)."""
  def fn(params, img, m):
    out = model.forward(nets, params, img, m, cfg, q)
    b = img.shape[0]
    return out["recon_depth"][:b], out["recon_mask"][:b]
  return jax.jit(fn)


def predict_depth(eval_fn, params, images_NxSxSx3, m, batch_size: int):
  """Runs the model over an array of images in batches (last one padded)."""
  depths, masks = [], []
  n = images_NxSxSx3.shape[0]
  for i in range(0, n, batch_size):
    chunk = images_NxSxSx3[i:i + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)], 0)
    d, mk = eval_fn(params, jnp.asarray(chunk), m)
    depths.append(np.asarray(d)[:batch_size - pad])
    masks.append(np.asarray(mk)[:batch_size - pad])
  return np.concatenate(depths), np.concatenate(masks)


def evaluate(eval_fn, params, data: dict, m, cfg, limit=None) -> dict:
  """SIDE / MAD of the model on a split with ground-truth depth (Unsup3D
  protocol: batch-wise gt max, eroded masks)."""
  from scr_jax import metrics
  n = data["images"].shape[0] if limit is None else min(limit, data["images"].shape[0])
  pred, valid = predict_depth(eval_fn, params, data["images"][:n], m, cfg.batch_size)
  cam = model.camera(cfg)
  per = []
  for i in range(0, n, cfg.batch_size):
    sl = slice(i, i + cfg.batch_size)
    per.append(metrics.evaluate_depth(jnp.asarray(pred[sl]), jnp.asarray(valid[sl]),
                                      jnp.asarray(data["depth"][:n][sl]), cam))
  return metrics.summarize(per), pred, valid


def place_candidates(state_K, m_Kx4x4, mesh):
  """Shards the candidate axis over the devices when it divides evenly (each
  device trains whole candidates, the batch is replicated); otherwise keeps
  candidates replicated and the batch sharded (data parallel)."""
  k, ndev = m_Kx4x4.shape[0], len(mesh.devices.flat)
  if ndev > 1 and k % ndev == 0:
    cand = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    put = lambda x: jax.device_put(x, cand)
    state_K = dict(params=jax.tree_util.tree_map(put, state_K["params"]),
                   opt_state=jax.tree_util.tree_map(put, state_K["opt_state"]),
                   step=replicate(state_K["step"], mesh))
    return state_K, put(m_Kx4x4), True
  return replicate(state_K, mesh), replicate(m_Kx4x4, mesh), False


def fit(cfg, workdir: str, train_data: dict, val_data=None, structure=None,
        resume: bool = True, quiet: bool = False, max_seconds=None, log=None,
        run_info=None, init_params=None):
  """Trains `cfg.steps` steps (or until `max_seconds`), resumable.

  structure: the `structure.Structure` to train (default: the config's,
  `structure.resolve_structure(cfg)`); its M is the adjacency (4x4) or, with
  q, the dense mask of dynamic SCR; a stack Kx4x4 (`structure.candidates`)
  trains K candidate structures at once (vmapped, same batches, same initial
  parameters), with state params/opt_state carrying the K axis.
  At each validation, SIDE / MAD on val_data and, when val_data carries the
  generator's ground truth (val_data["gt"], see data.load_gt), the
  diagnostics of scr_jax/diagnostics.py go to tensorboard and metrics.csv
  (prefix val/).
  run_info: optional dict(data=the --data argument,
  fingerprint=checkpoint.data_fingerprint(train images) if already computed,
  init_from=provenance of init_params), saved with the settings.
  init_params: start from these parameters (e.g. a pretrained or imported
  model; same shapes as this config's) with a fresh optimiser, unless the
  workdir already holds a checkpoint to resume from.
  Every checkpoint carries the run's settings (config, structure, a
  fingerprint of the training images; `checkpoint.run_settings`), and
  W/config.json + W/adjacency.json describe the run, so any workdir `fit`
  makes is read back by `workdir.restore` (eval, predict, diagnose). A resume is compared with
  the newest checkpoint's settings before anything is compiled or written; a
  workdir already at `cfg.steps` is left untouched.
  Returns a summary dict (step, start_step, seconds, reason, last metrics,
  state, nets, structure).

  Raises:
    UserError: the resume would change settings that change what is learned,
      or resume=False on a workdir that already holds checkpoints.
  """
  import time
  from scr_jax import checkpoint, runlog

  checkpoint.probe_writable(workdir)
  mesh = data_mesh()
  if cfg.batch_size % len(jax.devices()):
    raise ValueError(f"batch_size {cfg.batch_size} must divide over {len(jax.devices())} devices")
  st = structure_lib.resolve_structure(cfg) if structure is None else structure
  m, q, k = jnp.asarray(st.m, jnp.float32), st.q, st.k
  info = dict(run_info or {})
  data_info = dict(info.get("fingerprint") or dataset.fingerprint(train_data))
  if info.get("data"):
    data_info["spec"] = info["data"]
  settings = checkpoint.run_settings(cfg, st, data=data_info)
  if info.get("init_from"):
    settings["init_from"] = info["init_from"]
  note = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
  if resume:
    checkpoint.check_resume(workdir, settings, log=note)
  elif checkpoint.has_checkpoints(workdir):
    raise UserError(f"{workdir} already holds checkpoints; starting over (--no-resume) would "
                    "overwrite them: pass --restart to set them aside first, or use another "
                    "--workdir")
  nets, state = init_state(cfg, jax.random.PRNGKey(cfg.seed))
  if init_params is not None:
    like = jax.tree_util.tree_map(jnp.shape, state["params"])
    if jax.tree_util.tree_map(jnp.shape, init_params) != like:
      raise UserError("the initial parameters do not have this config's network shapes")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), init_params)
    state = dict(params=params, opt_state=make_optimizer(cfg).init(params), step=state["step"])
  if k:
    state = stack_state(state, k)
  mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
  if resume:
    restored = checkpoint.restore_latest(mngr, state)
    if restored is not None:
      state = restored
  start = int(jax.device_get(state["step"]))
  if start >= cfg.steps and (start or checkpoint.has_checkpoints(workdir)):
    # Nothing to train: nothing is written (config, logs, checkpoints).
    if not quiet:
      print(f"note: {workdir} is already at step {start} (steps={cfg.steps}); nothing trained, "
            "nothing written", file=sys.stderr, flush=True)
    return dict(step=start, start_step=start, seconds=0.0, reason="already trained", last={},
                state=state, nets=nets, structure=st)
  checkpoint.check_free_space(workdir, state, cfg.keep_checkpoints)
  if jax.process_index() == 0:
    checkpoint.save_run_files(workdir, settings)
  barrier("fit-start")
  put_batch = lambda x: shard_local_batch(x, mesh)
  shard = (jax.process_index(), jax.process_count())
  if k:
    state, m, by_candidate = place_candidates(state, m, mesh)
    if by_candidate:  # every device needs the whole batch
      put_batch, shard = (lambda x: replicate(x, mesh)), (0, 1)
    step_fn = make_candidate_step(nets, cfg, q)
  else:
    state = replicate(state, mesh)
    m = replicate(m, mesh)
    step_fn = make_train_step(nets, cfg, q)
  # The batches of steps [start, steps): grain, its state saved with each checkpoint.
  batches = dataset.Batches(train_data, cfg.batch_size, cfg.seed, start, cfg.steps, shard=shard,
                            state=checkpoint.load_data_state(mngr, start) if start else None)
  first = next(batches)
  step_fn = compile_in_step(step_fn, state, put_batch(first), m)
  eval_fn = make_eval_fn(nets, cfg, q) if val_data is not None else None
  log = log or runlog.RunLog(workdir, cfg.steps, cfg.batch_size * max(k, 1), quiet=quiet)
  t0 = time.time()
  reason, last = "done", {}
  if start and not quiet:
    print(f"resuming {workdir} from step {start}", flush=True)
  with _Signals() as sig, contextlib.closing(batches):
    step = start
    while step < cfg.steps:
      x, first = (first if first is not None else next(batches)), None
      state, met = step_fn(state, put_batch(x), m)
      step += 1
      if not bool(np.all(jax.device_get(met["finite"]))):
        if cfg.on_nonfinite == "stop":
          good = mngr.latest_step()
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
      if eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
        for i in range(max(k, 1)):
          params_i = unstack_params(state["params"], i) if k else state["params"]
          summ, _, _ = evaluate(eval_fn, params_i, val_data, m[i] if k else m, cfg,
                                limit=cfg.num_eval_images)
          values, line = dict(summ), ""
          if val_data.get("gt") is not None:  # generated data: what each factor learned
            from scr_jax import diagnostics
            diag = diagnostics.evaluate(nets, params_i, val_data, m[i] if k else m, cfg, q,
                                        limit=cfg.num_eval_images)
            values.update(diag)
            line = "\n    " + diagnostics.headline(diag)
          log.scalars(step, values, prefix=f"val_c{i:02d}" if k else "val")
          if not quiet:
            who = f" candidate {i}" if k else ""
            print(f"  val @ {step}{who}: SIDE {summ['side_mean']:.3f} x1e-2  "
                  f"MAD {summ['mad_mean']:.2f} deg{line}", file=sys.stderr, flush=True)
      if step % cfg.ckpt_every == 0:
        checkpoint.save(mngr, state, settings, batches.state())
      # Several processes must leave the loop at the same step (collectives).
      over = max_seconds is not None and time.time() - t0 > max_seconds
      if any_process(bool(sig.received) or over):
        reason = sig.received or ("time budget" if over else "stop on another process")
        break
  if mngr.latest_step() != step:
    checkpoint.save(mngr, state, settings, batches.state())
  log.close()
  if reason in ("SIGINT", "SIGTERM") and not quiet:
    print(f"{reason}: saved checkpoint at step {step} in {workdir}; rerun to resume",
          file=sys.stderr, flush=True)
  return dict(step=step, start_step=start, seconds=time.time() - t0, reason=reason,
              last=last, state=state, nets=nets, structure=st)
