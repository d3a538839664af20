"""Unsup3D's photometric objective with confidence maps and the flipped twin."""
from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-7


def photometric(recon_BxSxSxC, target_BxSxSxC, mask_BxSxS, sigma_BxSxS):
  """Masked mean of sqrt(2) |recon - target| / sigma + log(sigma) (Laplacian NLL
  up to a constant); pixels outside the mask do not count."""
  sigma = sigma_BxSxS[..., None] + EPS
  per = jnp.abs(recon_BxSxSxC - target_BxSxSxC) * jnp.sqrt(2.0) / sigma + jnp.log(sigma)
  m = jnp.broadcast_to(mask_BxSxS[..., None], per.shape)
  return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1.0)


def total_loss(out, img_BxSxSx3, cfg, perceptual_fn=None, step=None):
  """L = L1(orig) + lam_flip L1(flip) [+ lam_perc (Lp + lam_flip Lp_flip)].

  out: `model.forward` output (leading axis 2B = [orig; flip]).
  step: the training step (int32 scalar), for `cfg.conf_warmup_steps`; None
    (evaluation, search objectives) uses the predicted confidence.
  Returns (loss, metrics dict).
  """
  b = img_BxSxSx3.shape[0]
  target = img_BxSxSx3 * 2 - 1
  mask = out["recon_mask"]
  # Both reconstructions must cover a pixel for it to count; no gradient
  # flows through coverage (as Unsup3D detaches it).
  both = jax.lax.stop_gradient(mask[:b] * mask[b:])
  sig = out["sigma_l1"] + cfg.min_sigma
  if step is not None and cfg.conf_warmup_steps > 0:
    sig = jnp.where(step < cfg.conf_warmup_steps, jnp.ones_like(sig), sig)
  l1 = photometric(out["recon_im"][:b], target, both, sig[..., 0])
  l1_flip = photometric(out["recon_im"][b:], target, both, sig[..., 1])
  loss = l1 + cfg.lam_flip * l1_flip
  metrics = dict(loss_l1=l1, loss_l1_flip=l1_flip, mask_frac=jnp.mean(both))
  if perceptual_fn is not None and cfg.lam_perc > 0:
    lp, lp_flip = perceptual_fn(out, img_BxSxSx3, both)
    loss = loss + cfg.lam_perc * (lp + cfg.lam_flip * lp_flip)
    metrics.update(loss_perc=lp, loss_perc_flip=lp_flip)
  metrics["loss"] = loss
  return loss, metrics
