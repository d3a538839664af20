"""Best of K initialisations: `Config.init_trials` network initialisations train
`Config.init_trial_steps` steps side by side (one vmapped step, the same
batches, the same warm-ups); the run then continues from the one whose mean
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

With `Config.init_trial_depth_warmup="both"` each initialisation is also
tried without the depth warm-up: holding the shape at the convex prior
decides the yaw's sign right on faces but mirrors it on objects far from the
prior (car at cpu_small: yaw corr -0.99 with it, +0.99 without), while without
it faces come out mirrored and hollow. With `init_trial_checks` (default) only
candidates whose canonical depth is convex at the trial's end and whose views
stay inside their range compete (the photometric loss alone is lower for the
mirrored, hollow face too: morph step 300-500, -2.91 hollow vs -2.85 right;
and for a car whose pitch ran to its +60 degree bound: -3.22 vs -2.70). The winner's depth warm-up is saved
with the run, and the run continues from the winning candidate's trained
state (the same batches: nothing of the trial is thrown away).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import dataset, diagnostics, model, train_step
from scr_jax.warmup import Warmups


class Trial(NamedTuple):
  """The trial's outcome per candidate c (C = init_trials, x2 with
  init_trial_depth_warmup="both"; candidate c is `candidate_config(cfg, c)`).

  loss_C: mean training loss over the trial's second half (inf: non-finite).
  convex_C: fraction in [0, 1] of the last batch's images whose free model's
    canonical relief is convex (`diagnostics.relief` > 0); nan when unknown.
  saturated_C: fraction in [0, 1] of those images with a view rotation beyond
    `SATURATED` x cfg.xyz_rotation_range (at its tanh bound); nan when unknown.
  states: the candidates' TrainStates after the trial (list of C), or None.
  view_std_C: the largest over the three view rotations of their std over
    those images, degrees; nan when unknown.
  """
  loss_C: np.ndarray
  convex_C: np.ndarray
  saturated_C: np.ndarray | None = None
  states: list | None = None
  view_std_C: np.ndarray | None = None


# A view rotation this close to its range (tanh-scaled) counts as run away.
SATURATED = 0.9
# Views that vary less than this over a batch (degrees, the largest of the
# three rotations' std) count as collapsed: a view net that stopped reading
# the image (a constant view, yaw correlation 0), not a property of the data.
COLLAPSED_DEG = 0.5


def n_candidates(cfg) -> int:
  """How many candidates the trial trains: init_trials, twice that with
  init_trial_depth_warmup="both" and a depth warm-up to switch off (1: no
  trial; `config.Config.trials_wanted`)."""
  both = cfg.init_trial_depth_warmup == "both" and cfg.warmup.depth_steps > 0
  return cfg.init_trials * (2 if both else 1)


def candidate_config(cfg, c: int):
  """Candidate c's config: init_choice = c mod init_trials, and for the
  second half of the candidates (init_trial_depth_warmup="both") no depth
  warm-up (warmup.depth_steps = 0)."""
  cfg = dataclasses.replace(cfg, init_choice=c % cfg.init_trials)
  if c >= cfg.init_trials:
    cfg = dataclasses.replace(cfg, warmup=dataclasses.replace(cfg.warmup, depth_steps=0))
  return cfg


def _stack(states):
  first = states[0]
  stack = lambda *xs: jnp.stack(xs)
  return first.replace(params=jax.tree_util.tree_map(stack, *[s.params for s in states]),
                       opt_state=jax.tree_util.tree_map(stack, *[s.opt_state for s in states]))


def _unstack(state, i):
  pick = lambda x: x[i]
  return state.replace(params=jax.tree_util.tree_map(pick, state.params),
                       opt_state=jax.tree_util.tree_map(pick, state.opt_state))


def run_trials(cfg, train_data, structure, log=None) -> Trial:
  """Trains the `n_candidates(cfg)` candidates `cfg.init_trial_steps` steps
  on the run's first batches (those of `Config.seed`): the candidates of one
  warm-up setting as stacked candidates of `structure` (a single structure)
  in one vmapped step. Progress (every quarter of a group) goes to `log`.
  Returns their `Trial`."""
  steps, k = cfg.init_trial_steps, cfg.init_trials
  groups = []  # (configs of one warm-up setting, their candidate indices)
  for first in range(0, n_candidates(cfg), k):
    groups.append(list(range(first, first + k)))
  n = n_candidates(cfg)
  loss, convex, saturated = np.full(n, np.inf), np.full(n, np.nan), np.full(n, np.nan)
  view_std = np.full(n, np.nan)
  states = [None] * n_candidates(cfg)
  keep_from = steps - max(steps // 2, 1)
  t0 = time.time()
  for g, idx in enumerate(groups):
    gcfg = candidate_config(cfg, idx[0])
    made = [train_step.init_state(gcfg, train_step.init_key(candidate_config(cfg, c)))
            for c in idx]
    nets = made[0][0]
    state = _stack([s for _, s in made]).replace(step=jnp.asarray(0, jnp.int32))
    m = jnp.broadcast_to(jnp.asarray(structure.m, jnp.float32), (k,) + np.shape(structure.m))
    st_k = structure.replace(m=m, orders=tuple(f"init{c}" for c in idx))
    step_fn = train_step.make_candidate_step(nets, gcfg)
    total, count, bad = np.zeros(k), 0, np.zeros(k, bool)
    batches = dataset.Batches(train_data, cfg.batch_size, cfg.seed, 0, steps)
    x = None
    with contextlib.closing(batches):
      for step, x in enumerate(batches):
        state, met = step_fn(state, jnp.asarray(x), st_k)
        if log is not None and (step + 1) % max(steps // 4, 1) == 0:
          log(f"init trials: group {g + 1}/{len(groups)} ({k} candidates) step {step + 1}/"
              f"{steps}, {time.time() - t0:.0f}s")
        if step >= keep_from:
          lv = np.asarray(jax.device_get(met["loss"]), np.float64)
          bad |= ~np.isfinite(lv) | ~np.asarray(jax.device_get(met["finite"]))
          total += np.where(np.isfinite(lv), lv, 0.0)
          count += 1
    loss[idx] = np.where(bad, np.inf, total / max(count, 1))
    for j, c in enumerate(idx):
      states[c] = _unstack(state, j)
      if cfg.init_trial_checks and x is not None and np.isfinite(loss[c]):
        out = model.forward(nets, states[c].params, jnp.asarray(x), structure, gcfg,
                            Warmups.none())
        convex[c] = diagnostics.depth_sign(np.asarray(out.orig.canon_depth_BxSxS))
        rot_deg = np.rad2deg(np.asarray(out.factors.view_Bx6)[:, :3])
        saturated[c] = float(np.mean(np.abs(rot_deg).max(axis=1)
                                     >= SATURATED * cfg.xyz_rotation_range))
        view_std[c] = float(rot_deg.std(axis=0).max())
  return Trial(loss, convex, saturated, states, view_std)


def plausible(trial: Trial) -> np.ndarray:
  """Per candidate: a convex canonical depth on most images (convex_C >= 0.5),
  views inside their range on most (saturated_C < 0.5) and views that vary
  over the images (view_std_C >= COLLAPSED_DEG); an unknown figure passes."""
  ok = np.nan_to_num(np.asarray(trial.convex_C, np.float64), nan=0.0) >= 0.5
  if trial.saturated_C is not None:
    ok &= np.nan_to_num(np.asarray(trial.saturated_C, np.float64), nan=0.0) < 0.5
  if trial.view_std_C is not None:
    ok &= np.nan_to_num(np.asarray(trial.view_std_C, np.float64), nan=np.inf) >= COLLAPSED_DEG
  return ok


def choose(cfg, trial: Trial) -> int:
  """The winning candidate: the lowest finite trial loss among the
  `plausible` ones (among all when init_trial_checks is off or none is
  plausible); 0 when no loss is finite."""
  loss = np.asarray(trial.loss_C, np.float64)
  ok = np.isfinite(loss)
  if not ok.any():
    return 0
  if cfg.init_trial_checks:
    good = ok & plausible(trial)
    if good.any():
      ok = good
  return int(np.argmin(np.where(ok, loss, np.inf)))


def resolve_init(cfg, train_data, structure, log=None):
  """(cfg, state): cfg with `init_choice` resolved (>= 0) when there is more
  than one candidate (`n_candidates`; for a winner trained without it, the
  depth warm-up off), and the
  winner's TrainState after the trial (None when no trial ran). The trial's
  figures go to `log`. Unchanged (cfg, None) when there is one candidate,
  init_choice is already set (a resume: `workdir.Run.open` puts the saved
  choice into the run's config), or `structure` holds K candidates (they
  share one initialisation by design: noted to `log`)."""
  if n_candidates(cfg) <= 1 or cfg.init_choice >= 0:
    return cfg, None
  if structure.k:
    if log is not None:
      log(f"note: the init trials are skipped for {structure.k} candidate "
          "structures trained together (they share one initialisation)")
    return cfg, None
  n = n_candidates(cfg)
  if log is not None:
    alt = " (each also without the depth warm-up)" if n > cfg.init_trials else ""
    log(f"init trials: {cfg.init_trials} initialisations{alt} x {cfg.init_trial_steps} steps "
        "(the run continues from the lowest training loss"
        f"{' among convex shapes with varied views inside their range' if cfg.init_trial_checks else ''})")
  trial = run_trials(cfg, train_data, structure, log)
  choice = choose(cfg, trial)
  chosen = candidate_config(cfg, choice)
  if log is not None:
    def one(c):
      tag = f"{c % cfg.init_trials}{'/no-dw' if c >= cfg.init_trials else ''}"
      cv = "" if np.isnan(trial.convex_C[c]) else f" convex {trial.convex_C[c]:.2f}"
      if trial.saturated_C is not None and not np.isnan(trial.saturated_C[c]):
        cv += f" view-at-limit {trial.saturated_C[c]:.2f}"
      if trial.view_std_C is not None and not np.isnan(trial.view_std_C[c]):
        cv += f" view-std {trial.view_std_C[c]:.1f}deg"
      return f"{tag}: {trial.loss_C[c]:.4f}{cv}"
    first = cfg.init_trial_steps - max(cfg.init_trial_steps // 2, 1)
    log(f"init trials: mean loss over steps {first}-{cfg.init_trial_steps} "
        f"{{{', '.join(one(c) for c in range(n))}}}; continuing from {one(choice).split(':')[0]} "
        "(saved with the run as init_choice"
        f"{', depth_warmup_steps=0' if choice >= cfg.init_trials else ''})")
  state = trial.states[choice] if trial.states is not None else None
  return chosen, state
