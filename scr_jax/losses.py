"""Unsup3D's photometric objective with confidence maps and the flipped twin."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from scr_jax.warmup import Warmups

EPS = 1e-7


def photometric(recon_BxSxSxC, target_BxSxSxC, mask_BxSxS, sigma_BxSxS):
  """Masked mean of sqrt(2) |recon - target| / sigma + log(sigma) (Laplacian NLL
  up to a constant); pixels outside the mask do not count."""
  sigma = sigma_BxSxS[..., None] + EPS
  per = jnp.abs(recon_BxSxSxC - target_BxSxSxC) * jnp.sqrt(2.0) / sigma + jnp.log(sigma)
  m = jnp.broadcast_to(mask_BxSxS[..., None], per.shape)
  return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1.0)


def total_loss(out, cfg, perceptual_fn=None, warmups: Warmups = Warmups()):
  """L = L1(orig) + lam_flip L1(flip) [+ lam_perc (Lp + lam_flip Lp_flip)]
  [+ lam_light_floor mean(max(0, light_floor - ambient - diffuse))].

  out: a `model.ForwardOutput`; the reconstructions are compared with its
    input_BxSxSx3 (the input in the model's range [-1, 1]).
  perceptual_fn: None, or (out, mask_both_BxSxS) -> (Lp, Lp_flip)
    (`perceptual.make_perceptual_fn`).
  warmups: the training warm-ups' scales (`warmup.warmups(cfg, step)`, the
    same value the forward pass took); its `conf_hold` (True while the
    confidence warm-up runs) replaces the predicted confidence by sigma = 1.
    The default, `Warmups.none()` (evaluation, search objectives), uses the
    predicted confidence.
  Returns (loss, metrics dict).
  """
  target = out.input_BxSxSx3
  # Both reconstructions must cover a pixel for it to count; no gradient
  # flows through coverage (as Unsup3D detaches it).
  both = jax.lax.stop_gradient(out.orig.recon_mask_BxSxS * out.flip.recon_mask_BxSxS)
  sig = out.sigma_l1_BxSxSx2 + cfg.min_sigma
  if warmups.conf_hold is not None:
    sig = jnp.where(warmups.conf_hold, jnp.ones_like(sig), sig)
  l1 = photometric(out.orig.recon_im_BxSxSx3, target, both, sig[..., 0])
  l1_flip = photometric(out.flip.recon_im_BxSxSx3, target, both, sig[..., 1])
  loss = l1 + cfg.lam_flip * l1_flip
  metrics = dict(loss_l1=l1, loss_l1_flip=l1_flip, mask_frac=jnp.mean(both))
  if cfg.light_floor > 0:
    intensity = out.factors.ambient_B + out.factors.diffuse_B
    barrier = jnp.mean(jax.nn.relu(cfg.light_floor - intensity))
    loss = loss + cfg.lam_light_floor * barrier
    metrics["loss_light_floor"] = barrier
  if perceptual_fn is not None and cfg.lam_perc > 0:
    lp, lp_flip = perceptual_fn(out, both)
    loss = loss + cfg.lam_perc * (lp + cfg.lam_flip * lp_flip)
    metrics.update(loss_perc=lp, loss_perc_flip=lp_flip)
  metrics["loss"] = loss
  return loss, metrics
