"""Best of K initialisations: `Config.init_trials` network initialisations train
`Config.init_trial_steps` steps side by side (one vmapped step, the same
batches, the same warm-ups); the run then starts from the one whose mean
training photometric loss over the second half of the trial is lowest.

Why: on data the presets were not tuned for, some initialisations never learn
the view (morph and cat seed 1 at cpu_small: the view embedding constant over
images, yaw correlation ~0, the shape spread falling to 0.01-0.06 of the
truth's by step 500), and the training loss tells them apart within the first
100 steps (morph at step 100: -1.15 against -2.47 for an initialisation that
learns; cat: -2.07 against -2.63). The criterion needs no ground truth and
assumes nothing about the object's geometry. See docs/learning.md.

The choice is saved in the run's config (`Config.init_choice`), so a resumed
run, `eval` and the settings comparison see the same model; candidate 0 is
the plain initialisation of `Config.seed` (`train_step.init_key`), so
init_trials=1 is exactly the run without trials. The data order stays a
function of `Config.seed` whatever the choice.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import dataset, train_step


def trial_losses(cfg, train_data, structure) -> np.ndarray:
  """The K = cfg.init_trials initialisations (keys `train_step.init_key(cfg, k)`)
  trained cfg.init_trial_steps steps as K stacked candidates of `structure`
  (a single structure); returns the K mean training losses over the second
  half of the steps (inf for a candidate with a non-finite loss)."""
  k, steps = cfg.init_trials, cfg.init_trial_steps
  states = [train_step.init_state(cfg, train_step.init_key(cfg, i)) for i in range(k)]
  nets = states[0][0]
  stack = lambda *xs: jnp.stack(xs)
  first = states[0][1]
  state = first.replace(
      params=jax.tree_util.tree_map(stack, *[s.params for _, s in states]),
      opt_state=jax.tree_util.tree_map(stack, *[s.opt_state for _, s in states]),
      step=jnp.asarray(0, jnp.int32))
  m = jnp.broadcast_to(jnp.asarray(structure.m, jnp.float32), (k,) + np.shape(structure.m))
  st_k = structure.replace(m=m, orders=tuple(f"init{i}" for i in range(k)))
  step_fn = train_step.make_candidate_step(nets, cfg)
  keep_from = steps - max(steps // 2, 1)
  total, count = np.zeros(k), 0
  bad = np.zeros(k, bool)
  batches = dataset.Batches(train_data, cfg.batch_size, cfg.seed, 0, steps)
  with contextlib.closing(batches):
    for step, x in enumerate(batches):
      state, met = step_fn(state, jnp.asarray(x), st_k)
      if step >= keep_from:
        loss = np.asarray(jax.device_get(met["loss"]), np.float64)
        bad |= ~np.isfinite(loss) | ~np.asarray(jax.device_get(met["finite"]))
        total += np.where(np.isfinite(loss), loss, 0.0)
        count += 1
  return np.where(bad, np.inf, total / max(count, 1))


def resolve_init(cfg, train_data, structure, log=None):
  """cfg with `init_choice` resolved (>= 0) when cfg.init_trials > 1: the
  trial (`trial_losses`), its losses told to `log`. Unchanged when
  init_trials <= 1, init_choice is already set (a resume: `workdir.Run.open`
  puts the saved choice into the run's config), or `structure` holds K
  candidates (they share one initialisation by design: noted to `log`)."""
  if cfg.init_trials <= 1 or cfg.init_choice >= 0:
    return cfg
  if structure.k:
    if log is not None:
      log(f"note: init_trials={cfg.init_trials} is skipped for {structure.k} candidate "
          "structures trained together (they share one initialisation)")
    return cfg
  if log is not None:
    log(f"init trials: {cfg.init_trials} initialisations x {cfg.init_trial_steps} steps "
        "(the run then starts from the one with the lowest training loss)")
  losses = trial_losses(cfg, train_data, structure)
  if not np.isfinite(losses).any():
    choice = 0
  else:
    choice = int(np.argmin(losses))
  if log is not None:
    text = ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(losses))
    log(f"init trials: mean loss over steps {cfg.init_trial_steps - max(cfg.init_trial_steps // 2, 1)}"
        f"-{cfg.init_trial_steps} by initialisation {{{text}}}; starting from {choice} "
        "(saved with the run as init_choice)")
  return dataclasses.replace(cfg, init_choice=choice)
