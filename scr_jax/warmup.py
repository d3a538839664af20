"""The training-only warm-ups as one value: `warmups(cfg, step) -> Warmups`.

`config.Warmup` (the group `Config.warmup`) says how long each warm-up runs;
`warmups` turns the training step into the scales of one step, and the
forward pass (`model.forward`) and the loss (`losses.total_loss`) take that
one value. `Warmups.none()` (every scale None) is the free model: evaluation,
search objectives, anything outside training.

Adding a warm-up: a field in `config.Warmup`, its scale here (a field of
`Warmups` and its line in `warmups`), and the one place that applies it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Warmups(NamedTuple):
  """The warm-up scales of one training step; a field is None when that
  warm-up is off (or outside training), which applies nothing at all.

  conf_hold: bool scalar; True: the loss uses sigma = 1 instead of the
    predicted confidence (`Warmup.conf_steps`).
  sym: weight in [0, 1] of the symmetric part of the canonical maps
    `Warmup.sym_maps` (1 = fully symmetric; `Warmup.sym_steps`).
  trans: scale in [0, 1] of the view's translation (0 = held at 0).
  tilt: scale in [0, 1] of the view's pitch and roll (yaw stays free).
  depth: scale in [0, 1] of the depth net's output (0 = the convex prior alone).
  light: scale in [0, 1] of the light intensities' raw outputs (0 = ambient
    and diffuse held at 0.5; `Warmup.light_steps`).
  prior: scale in [0, 1] of the convex prior's amplitude (`Warmup.prior_steps`;
    the free model then has no prior: `model.prior_amplitude`).
  fit: weight in [0, 1] of the fitted light against the light network's
    (`Config.light_fit`, `Warmup.fit_steps`; 0 = the network's light).

  A NamedTuple, so a pytree (None fields are empty subtrees).
  """
  conf_hold: jax.Array | None = None
  sym: jax.Array | None = None
  trans: jax.Array | None = None
  tilt: jax.Array | None = None
  depth: jax.Array | None = None
  prior: jax.Array | None = None
  light: jax.Array | None = None
  fit: jax.Array | None = None

  @classmethod
  def none(cls) -> "Warmups":
    """No warm-up: the free model (evaluation)."""
    return cls()


def _hold(n: int, step):
  """1 for the first half of an n-step warm-up, then linearly down to 0 at n;
  None when off (n <= 0)."""
  if n <= 0:
    return None
  return jnp.clip((n - step) / (n / 2), 0.0, 1.0)


def _release(n: int, step):
  """1 - `_hold`: 0 for the first half, then up to 1 at n; None when off."""
  w = _hold(n, step)
  return None if w is None else 1.0 - w


def warmups(cfg, step) -> Warmups:
  """The scales of the warm-ups `cfg.warmup` at training step `step` (an
  int32 scalar, traced inside the jitted step; None outside training gives
  `Warmups.none()`)."""
  if step is None:
    return Warmups.none()
  w = cfg.warmup
  return Warmups(conf_hold=(step < w.conf_steps) if w.conf_steps > 0 else None,
                 sym=_hold(w.sym_steps, step),
                 trans=_release(w.trans_steps, step),
                 tilt=_release(w.tilt_steps, step),
                 depth=_release(w.depth_steps, step),
                 prior=_hold(w.prior_steps, step),
                 light=_release(w.light_steps, step),
                 fit=_release(w.fit_steps, step))
