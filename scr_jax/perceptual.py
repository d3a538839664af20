"""VGG16 relu3_3 perceptual loss with a confidence map (Unsup3D's second term).

Weights are not downloadable here: the user converts torchvision's
vgg16 ImageNet file once with third_party/convert_vgg16.py into an .npz of
HWIO kernels (conv1_1 ... conv3_3) and points `vgg_weights` at it.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import model
from scr_jax.errors import UserError

LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3")
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
EPS = 1e-7


def load_vgg(path: str) -> dict:
  """{layer: (kernel_3x3xCinxCout, bias_Cout)} from a converted .npz."""
  if not os.path.exists(path):
    raise UserError(f"VGG16 weights {path} not found (see third_party/README.md)")
  try:
    f = np.load(path)
    return {k: (jnp.asarray(f[k + "/kernel"]), jnp.asarray(f[k + "/bias"])) for k in LAYERS}
  except (KeyError, ValueError, OSError) as e:
    raise UserError(f"{path}: not a converted VGG16 file ({e})") from None


def features(vgg: dict, img_BxHxWx3):
  """relu3_3 features of images in [-1, 1] (ImageNet-normalised inside)."""
  x = (model.to_unit_range(img_BxHxWx3) - _MEAN) / _STD
  for i, name in enumerate(LAYERS):
    k, b = vgg[name]
    x = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    x = jax.nn.relu(x)
    if name in ("conv1_2", "conv2_2"):
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return x


def confidence_loss(f1, f2, mask_BxHxW, sigma_BxhxW):
  """Masked mean of (f1 - f2)^2 / (2 sigma^2) + log(sigma); the mask is
  average-pooled to the feature resolution."""
  b, h, w, _ = f1.shape
  k = mask_BxHxW.shape[1] // h
  m = mask_BxHxW.reshape(b, h, k, w, k).mean(axis=(2, 4))[..., None]
  s = sigma_BxhxW[..., None] + EPS
  per = (f1 - f2) ** 2 / (2 * s**2) + jnp.log(s)
  m = jnp.broadcast_to(m, per.shape)
  return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1e-6)


def make_perceptual_fn(vgg: dict):
  """(out, mask_both_BxSxS) -> (Lp, Lp_flip) for losses.total_loss; out is a
  `model.ForwardOutput` (images in [-1, 1] inside it)."""
  def fn(out, mask):
    b = out.input_BxSxSx3.shape[0]
    target = jax.lax.stop_gradient(features(vgg, out.input_BxSxSx3))
    # the two reconstructions as one batch of 2B, as they were rendered
    recon = features(vgg, jnp.concatenate([out.orig.recon_im_BxSxSx3,
                                           out.flip.recon_im_BxSxSx3], 0))
    sig = out.sigma_perc_BxTxTx2
    return (confidence_loss(recon[:b], target, mask, sig[..., 0]),
            confidence_loss(recon[b:], target, mask, sig[..., 1]))
  return fn
