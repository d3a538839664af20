"""Networks: per-factor encoders f1 into a common d-dim space, decoders f2.

Shapes follow Unsup3D (no biases, GroupNorm with 4 channels per group, input in
[-1, 1]) with widths and image size from the config, split at the bottleneck
so that SCR can mix embeddings between f1 and f2 (paper Eq. 3):
  V, L: f1 = stride-2 conv stack to a 1x1 d-dim feature; f2 = 1x1 conv + tanh.
  D, A: f1 = conv encoder to a d-dim bottleneck; f2 = the deconv decoder.
  C (confidence): a separate encoder-decoder, not a causal factor.
All modules are NHWC. The number of stride-2 stages follows the image size.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_conv = lambda feat, k, s, p: nn.Conv(feat, (k, k), (s, s), padding=p, use_bias=False)
_deconv = lambda feat, k, s: nn.ConvTranspose(
    feat, (k, k), (s, s), padding="SAME" if s == 2 else "VALID", use_bias=False)


def _gn(x):
  return nn.GroupNorm(num_groups=max(1, x.shape[-1] // 4), epsilon=1e-5)(x)


def _stages(image_size: int) -> int:
  """Stride-2 stages from the image size down to 4x4 (then a 4x4 valid conv)."""
  return int(math.log2(image_size)) - 2


class Encoder(nn.Module):
  """f1 of V and L: image_BxSxSx3 -> u_Bxd (Unsup3D's Encoder up to its last ReLU)."""
  nf: int
  embed_dim: int

  @nn.compact
  def __call__(self, img):
    x = img
    for i in range(_stages(img.shape[1])):
      x = nn.relu(_conv(self.nf * min(2**i, 8), 4, 2, 1)(x))
    x = nn.relu(_conv(self.embed_dim, 4, 1, "VALID")(x))
    return x.reshape(x.shape[0], -1)


class Head(nn.Module):
  """f2 of V and L: u_Bxd -> tanh(1x1 conv) with `out` channels."""
  out: int

  @nn.compact
  def __call__(self, u):
    return jnp.tanh(nn.Dense(self.out, use_bias=False)(u))


class EDEncoder(nn.Module):
  """f1 of D and A: image -> d-dim bottleneck (conv, GN, LeakyReLU 0.2)."""
  nf: int
  embed_dim: int

  @nn.compact
  def __call__(self, img):
    x = img
    n = _stages(img.shape[1])
    for i in range(n):
      x = _conv(self.nf * min(2**i, 8), 4, 2, 1)(x)
      if i < n - 1:  # Unsup3D: no GroupNorm before the bottleneck conv
        x = _gn(x)
      x = nn.leaky_relu(x, 0.2)
    x = nn.relu(_conv(self.embed_dim, 4, 1, "VALID")(x))
    return x.reshape(x.shape[0], -1)


class EDDecoder(nn.Module):
  """f2 of D and A: u_Bxd -> BxSxSx`out` map (deconvs, nearest x2, 5x5 convs)."""
  nf: int
  out: int
  image_size: int
  activation: str = "none"  # none | tanh

  @nn.compact
  def __call__(self, u):
    x = u.reshape(u.shape[0], 1, 1, -1)
    n = _stages(self.image_size)
    top = self.nf * min(2**(n - 1), 8)
    x = nn.relu(_deconv(top, 4, 1)(x))  # 1 -> 4
    x = nn.relu(_conv(top, 3, 1, 1)(x))
    for i in reversed(range(n - 1)):  # 4 -> S/2
      feat = self.nf * min(2**i, 8)
      x = nn.relu(_gn(_deconv(feat, 4, 2)(x)))
      x = nn.relu(_gn(_conv(feat, 3, 1, 1)(x)))
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")  # S/2 -> S
    x = nn.relu(_gn(_conv(self.nf, 3, 1, 1)(x)))
    x = nn.relu(_gn(_conv(self.nf, 5, 1, 2)(x)))
    x = _conv(self.out, 5, 1, 2)(x)
    return jnp.tanh(x) if self.activation == "tanh" else x


class ConfNet(nn.Module):
  """Confidence maps: image -> (sigma_BxSxSx2 for L1, sigma_Bx(S/4)x(S/4)x2 for
  the perceptual loss); channel 0 = original, 1 = flipped reconstruction."""
  nf: int
  zdim: int

  @nn.compact
  def __call__(self, img):
    n = _stages(img.shape[1])
    x = EDEncoder(self.nf, self.zdim)(img).reshape(img.shape[0], 1, 1, -1)
    top = self.nf * min(2**(n - 1), 8)
    x = nn.relu(_deconv(top, 4, 1)(x))  # 1 -> 4
    for i in reversed(range(n - 2)):  # 4 -> S/4
      x = nn.relu(_gn(_deconv(self.nf * min(2**(i + 1), 8), 4, 2)(x)))
    perc = nn.softplus(_conv(2, 3, 1, 1)(x))
    x = nn.relu(_gn(_deconv(self.nf * 2, 4, 2)(x)))  # S/4 -> S/2
    x = nn.relu(_gn(_deconv(self.nf, 4, 2)(x)))  # S/2 -> S
    l1 = nn.softplus(_conv(2, 5, 1, 2)(x))
    return l1, perc


class SCRNets(nn.Module):
  """All networks. `encode` gives u_Bx4xd (order V, D, L, A); `decode` maps
  mixed embeddings to raw factor outputs; `confidence` the sigma maps."""
  embed_dim: int
  nf_encoder: int
  nf_ed: int
  nf_conf: int
  conf_zdim: int
  image_size: int

  def setup(self):
    d = self.embed_dim
    self.f1 = dict(V=Encoder(self.nf_encoder, d), D=EDEncoder(self.nf_ed, d),
                   L=Encoder(self.nf_encoder, d), A=EDEncoder(self.nf_ed, d))
    self.f2 = dict(V=Head(6), L=Head(4),
                   D=EDDecoder(self.nf_ed, 1, self.image_size, "none"),
                   A=EDDecoder(self.nf_ed, 3, self.image_size, "tanh"))
    self.conf = ConfNet(self.nf_conf, self.conf_zdim)

  def encode(self, img):
    return jnp.stack([self.f1[f](img) for f in ("V", "D", "L", "A")], axis=1)

  def decode(self, e_Bx4xd):
    return {f: self.f2[f](e_Bx4xd[:, i]) for i, f in enumerate(("V", "D", "L", "A"))}

  def confidence(self, img):
    return self.conf(img)

  def __call__(self, img):  # used for init only
    return self.decode(self.encode(img)), self.confidence(img)


def make_nets(cfg) -> SCRNets:
  return SCRNets(cfg.embed_dim, cfg.nf_encoder, cfg.nf_ed, cfg.nf_conf, cfg.conf_zdim,
                 cfg.image_size)


def param_counts(params) -> dict:
  """Trainable parameter counts per top-level module and in total."""
  counts = {}
  for name, sub in params["params"].items():
    counts[name] = sum(x.size for x in jax.tree_util.tree_leaves(sub))
  counts["total"] = sum(counts.values())
  return counts
