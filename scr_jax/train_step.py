"""The training step: loss, optimiser, and the jitted step.

`make_train_step(nets, cfg)` gives train_step(state, img_BxSxSx3, structure)
-> (state, metrics), pure; state is a `TrainState` (flax's: apply_fn and the
optimiser tx built once by `init_state`, params, opt_state, step), checkpointed
as the plain tree {params, opt_state, step} (`TrainState.tree`); structure is a
single `structure.Structure`. K candidate structures (a Structure with a K
axis, params / opt_state with a leading K axis, `stack_state`) train in one
step vmapped by `over_candidates`, the one place the candidate axis is mapped
(`make_candidate_step`, `make_val_loss_fn(stacked=True)`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from scr_jax import losses, model, nets as nets_lib, perceptual, structure as structure_lib, warmup


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


LR_COSINE_FLOOR = 0.05  # Config.lr_cosine_steps: the lr ends at 5% of cfg.lr


def _linear_warmup(lr, steps: int):
  """lr (a float or an optax schedule) times min(1, (k + 1) / steps) at update k
  (Goyal et al. 2017, "Accurate, large minibatch SGD", Sec. 2.2): the first
  update is lr / steps, update steps - 1 on is the plain lr."""
  base = lr if callable(lr) else (lambda k: lr)
  return lambda k: base(k) * jnp.minimum(1.0, (k + 1.0) / steps)


@functools.lru_cache(maxsize=32)  # one tx per config: a TrainState's static part
def make_optimizer(cfg):
  # Unsup3D: Adam with weight decay added to the gradient (coupled L2). With
  # warm-ups on, the decay skips the parameters a warm-up cuts off (see
  # decay_where_trained); without them (paper) it is exactly Unsup3D's.
  # A schedule adds a step count to Adam's state: only when asked for.
  lr = (optax.cosine_decay_schedule(cfg.lr, cfg.lr_cosine_steps, alpha=LR_COSINE_FLOOR)
        if cfg.lr_cosine_steps else cfg.lr)
  if cfg.lr_warmup_steps:  # Adam's first steps are ~lr per weight whatever the gradient
    lr = _linear_warmup(lr, cfg.lr_warmup_steps)
  if cfg.weight_decay_mode == "decoupled":  # AdamW: the decay bypasses Adam's scaling
    parts = [optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay)]
  else:
    decay = (decay_where_trained(cfg.weight_decay) if cfg.warmup.any_on()
             else optax.add_decayed_weights(cfg.weight_decay))
    parts = [decay, optax.adam(lr, b1=0.9, b2=0.999)]
  if cfg.lr_view_mult != 1.0:  # only then: the optimiser state keeps Unsup3D's shape
    is_view = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[1], "key", None) in ("f1_V", "f2_V"), params)
    parts.append(optax.masked(optax.scale(cfg.lr_view_mult), is_view))
  return optax.chain(*parts)


class TrainState(train_state.TrainState):
  """flax's TrainState: step (int32 scalar; candidates advance together),
  params and opt_state (a leading K axis for stacked candidates), and the
  static apply_fn (nets.apply) and tx (`make_optimizer(cfg)`)."""

  def tree(self) -> dict:
    """The arrays as {params, opt_state, step}: what a checkpoint holds."""
    return dict(params=self.params, opt_state=self.opt_state, step=self.step)

  def with_tree(self, tree: dict) -> "TrainState":
    """This state with the arrays of a checkpoint tree (`tree`)."""
    return self.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])



def new_state(nets, cfg, params, step: int = 0) -> TrainState:
  """A TrainState for `params` (this config's network shapes) at `step`,
  with a fresh optimiser state."""
  tx = make_optimizer(cfg)
  return TrainState(step=jnp.asarray(step, jnp.int32), apply_fn=nets.apply, params=params,
                    tx=tx, opt_state=tx.init(params))


def init_key(cfg, choice=None) -> jax.Array:
  """The PRNG key of the networks' initialisation: PRNGKey(cfg.seed) for
  choice 0 (and for cfg.init_choice -1, no choice), else fold_in(PRNGKey(seed),
  choice); choice defaults to cfg.init_choice (scr_jax/init_trials.py)."""
  choice = cfg.init_choice if choice is None else choice
  key = jax.random.PRNGKey(cfg.seed)
  return key if choice <= 0 else jax.random.fold_in(key, choice)


def init_state(cfg, rng):
  """Returns (nets module, TrainState at step 0 from a fresh initialisation)."""
  nets = nets_lib.make_nets(cfg)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return nets, new_state(nets, cfg, _flat_initial_depth(nets.init(rng, x)))


def _flat_initial_depth(params):
  """Zero the depth decoder's last conv: training starts from a flat canonical
  depth, so early random views do not stretch the mesh into huge faces."""
  p = jax.tree_util.tree_map(lambda x: x, params)  # copy the containers
  dec = p["params"]["f2_D"]
  last = sorted((k for k in dec if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))[-1]
  dec[last]["kernel"] = jnp.zeros_like(dec[last]["kernel"])
  return p


def loss_fn(params, nets, img, structure, cfg, perceptual_fn=None, step=None):
  """(total loss, metrics) of one batch img_BxSxSx3 in [0, 1] under a single
  structure; `step` (None outside training) sets the warm-ups, one
  `warmup.Warmups` value for both the forward pass and the loss."""
  warm = warmup.warmups(cfg, step)
  out = model.forward(nets, params, img, structure, cfg, warm)
  return losses.total_loss(out, cfg, perceptual_fn, warm)


def perceptual_for(cfg):
  """The perceptual-loss function when the config asks for one (else None)."""
  if cfg.lam_perc > 0 and cfg.vgg_weights:
    return perceptual.make_perceptual_fn(perceptual.load_vgg(cfg.vgg_weights))
  return None


def _train_step_fn(nets, cfg, objective=None):
  """The un-jitted step(state, batch, structure) -> (state, metrics).

  objective: None (SCR: batch = img_BxSxSx3, `loss_fn` with the perceptual
    loss the config asks for), or any objective(params, batch, structure,
    step) -> (loss, metrics dict with "loss") trained by the same optimiser and
    non-finite rule (e.g. reproduce's supervised baseline, batch = (img, depth)).
  """
  if objective is None:
    perc = perceptual_for(cfg)
    objective = lambda p, img, structure, step: loss_fn(p, nets, img, structure, cfg, perc,
                                                        step)

  def step(state, batch, structure):
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, batch, structure, state.step)
    new = state.apply_gradients(grads=grads)
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    # A non-finite step leaves params and optimiser state untouched; the host
    # then stops (keeping the last good checkpoint) or skips the batch.
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = dict(metrics, grad_norm=gnorm, finite=finite)
    new = new.replace(params=keep(new.params, state.params),
                      opt_state=keep(new.opt_state, state.opt_state))
    return new, metrics

  return step


@functools.lru_cache(maxsize=16)  # same (nets, cfg) -> same jitted fn, no recompile
def make_train_step(nets, cfg, objective=None):
  """Returns train_step(state, batch, structure) -> (state, metrics), jitted
  (`structure.jit`: one compile per q and M shape, whatever the labels);
  batch = img_BxSxSx3 in [0, 1] for SCR (objective None, see `_train_step_fn`)."""
  return structure_lib.jit(_train_step_fn(nets, cfg, objective), donate_argnums=0)


def stack_axes(state):
  """The vmap axes of a stacked state: params and optimiser state carry a
  leading K axis, the step counter stays a scalar (all candidates advance
  together)."""
  return state.replace(params=0, opt_state=0, step=None)


def over_candidates(fn, state_axes=0, out_axes=0):
  """The one place the candidate axis is mapped: fn(state_or_params, img,
  structure) -> fn over K candidates, vmapped over the state's K axis
  (`state_axes`: a vmap in_axes spec, or "state" for a stacked TrainState)
  and the Structure's (m Kx4x4), the image batch shared by all candidates;
  out_axes likewise ("state" inside it for the returned state)."""
  if state_axes != "state":
    return jax.vmap(fn, in_axes=(state_axes, None, 0), out_axes=out_axes)

  def mapped(state, img, structure):
    axes = stack_axes(state)
    outs = tuple(axes if a == "state" else a for a in out_axes)
    return jax.vmap(fn, in_axes=(axes, None, 0), out_axes=outs)(state, img, structure)

  return mapped


def stack_state(state, k: int):
  """K copies of one initial state (same init: candidates differ only in M)."""
  tile = lambda x: jnp.broadcast_to(x, (k,) + x.shape)
  return state.replace(params=jax.tree_util.tree_map(tile, state.params),
                       opt_state=jax.tree_util.tree_map(tile, state.opt_state),
                       step=jnp.array(state.step))  # a copy: the step donates its input


def unstack_params(params_K, i: int):
  return jax.tree_util.tree_map(lambda x: x[i], params_K)


@functools.lru_cache(maxsize=16)
def make_candidate_step(nets, cfg):
  """K candidate structures in one compiled step: jax.vmap of the train step
  over (params, opt_state, structure m Kx4x4), the same image batch for all
  candidates. Returns step(state_K, img_BxSxSx3, structure_K) -> (state_K,
  metrics_K).

  `nets.conv2d` batches per-candidate kernels as batched matmuls (small
  layers) or one plain conv per candidate (on CPU), not as grouped convs, so
  K candidates cost about K single steps (experiments/bench_candidates.py;
  the unrolled candidate loop makes the first compile slow at large K).
  """
  step = over_candidates(_train_step_fn(nets, cfg), "state", ("state", 0))
  return structure_lib.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def make_val_loss_fn(nets, cfg, stacked=False):
  """(params, img, structure) -> photometric loss (the objective of structure
  search); with stacked=True, over K candidates (params_K, structure_K)."""
  def fn(params, img, structure):
    return loss_fn(params, nets, img, structure, cfg)[0]
  return structure_lib.jit(over_candidates(fn) if stacked else fn)
