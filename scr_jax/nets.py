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

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")
# Patch buffer per chunk of the im2col kernel gradient (bounds its memory).
_IM2COL_CHUNK_BYTES = 256 << 20


def lax_conv(x, k, stride, pad):
  """lax's NHWC / HWIO conv with symmetric padding (the reference for `conv2d`)."""
  return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=_DN)


def _out_size(n, k, stride, pad):
  return (n + 2 * pad - k) // stride + 1


def _patches(x_BxHxWxC, kh, kw, stride, pad):
  """Shifted-slices im2col: B x Ho x Wo x (kh*kw*C), channels ordered (i, j, c)
  like a HWIO kernel reshaped to (kh*kw*C) x O."""
  _, h, w, _ = x_BxHxWxC.shape
  ho, wo = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  span = lambda i, size: slice(i, i + stride * (size - 1) + 1, stride)
  return jnp.concatenate([xp[:, span(i, ho), span(j, wo)] for i in range(kh)
                          for j in range(kw)], axis=-1)


def matmul_conv(x_BxHxWxC, k_KxKxCxO, stride: int, pad: int):
  """The conv as im2col + one matmul (plain autodiff: slices, pads and dots).
  Under `jax.vmap` over per-candidate kernels the dot gets a batch dimension
  (a batched matmul), where lax's conv would become a grouped convolution."""
  kh, kw, c, o = k_KxKxCxO.shape
  cols = _patches(x_BxHxWxC, kh, kw, stride, pad)
  return jnp.einsum("bhwn,no->bhwo", cols, k_KxKxCxO.reshape(kh * kw * c, o))


# The rule, measured (README "conv2d"): experiments/bench_train.py --rule times
# every layer on both paths (single and vmapped), --paths the whole step for
# several thresholds. Building the patches costs more memory traffic than
# XLA:CPU's own conv (which packs them in cache) except where they are a
# reshape of the input (1x1 outputs: the 4x4 convs to the bottleneck); the
# step with 1024 was as fast as all-lax (0 = `main`'s arithmetic), with 8192
# 4-13% slower, with im2col everywhere 2.2x slower.
MATMUL_MAX_PATCH = 1 << 10


def uses_matmul(x_shape, k_shape, stride: int, pad: int) -> bool:
  """True where `conv2d` computes the conv as an im2col matmul (`matmul_conv`)."""
  kh, kw, c, _ = k_shape
  ho, wo = _out_size(x_shape[1], kh, stride, pad), _out_size(x_shape[2], kw, stride, pad)
  return ho * wo * kh * kw * c <= MATMUL_MAX_PATCH


def _kernel_grad_im2col(x_BxHxWxC, dy_BxHoxWoxO, kh, kw, stride, pad):
  """dL/dk as patches^T @ dy, summed over batch chunks that bound the patch
  buffer (a Python loop, not a scan: XLA's cost analysis counts every chunk)."""
  b, ho, wo, o = dy_BxHoxWoxO.shape
  c = x_BxHxWxC.shape[-1]
  n = int(max(1, min(b, _IM2COL_CHUNK_BYTES // (ho * wo * kh * kw * c * 4))))
  dk = 0.0
  for s in range(0, b, n):
    cols = _patches(x_BxHxWxC[s:s + n], kh, kw, stride, pad).reshape(-1, kh * kw * c)
    dk = dk + cols.T @ dy_BxHoxWoxO[s:s + n].reshape(-1, o)
  return dk.reshape(kh, kw, c, o)


def _map_candidates(fn, axis_size, in_batched, *args):
  """custom_vmap rule: one plain op per candidate, unrolled (a lax.map loop
  was measured ~50x slower: XLA:CPU runs convs inside a while loop slowly)."""
  pick = lambda i: [a[i] if b else a for a, b in zip(args, in_batched)]
  return jnp.stack([fn(*pick(i)) for i in range(axis_size)]), True


@functools.lru_cache(maxsize=None)
def _lax_ops(x_shape, k_shape, stride, pad):
  """The three bilinear ops of one lax conv layer, closed under reverse-mode
  differentiation (any order) and each with a vmap rule that, on CPU, loops
  over candidates instead of lowering to a grouped convolution (XLA:CPU expands
  those into a K-times larger block-diagonal conv):
    F(x, k)  = y            (the conv)
    D(dy, k) = dL/dx        (its input gradient)
    G(x, dy) = dL/dk        (its kernel gradient)
  with vjps F: (D(c, k), G(x, c)); D: (F(c, k), G(c, dy)); G: (D(dy, c), F(x, c)).
  Only the kernel gradient of layers with >= 32 output channels is computed
  differently from lax's: as an im2col matmul (XLA:CPU runs lax's, a conv with a
  huge window and a tiny output, slowly for those; bench_train.py --layers)."""
  kh, kw, _, o = k_shape
  conv = lambda x, k: lax_conv(x, k, stride, pad)

  def f_impl(x, k):
    return conv(x, k)

  def d_impl(dy, k):
    # (the batch may be folded candidates x images: take it from dy)
    x0 = jnp.zeros((dy.shape[0],) + x_shape[1:], dy.dtype)
    return jax.vjp(lambda x: conv(x, k), x0)[1](dy)[0]

  def g_impl(x, dy):
    if o >= 32:
      return _kernel_grad_im2col(x, dy, kh, kw, stride, pad)
    return jax.vjp(lambda k: conv(x, k), jnp.zeros(k_shape, x.dtype))[1](dy)[0]

  ops = {}
  for name, impl in (("F", f_impl), ("D", d_impl), ("G", g_impl)):
    op = jax.custom_batching.custom_vmap(impl)
    op.def_vmap(functools.partial(_fold_or_map, name, op))
    ops[name] = jax.custom_vjp(op)
  F, D, G = ops["F"], ops["D"], ops["G"]
  F.defvjp(lambda x, k: (F(x, k), (x, k)), lambda r, c: (D(c, r[1]), G(r[0], c)))
  D.defvjp(lambda dy, k: (D(dy, k), (dy, k)), lambda r, c: (F(c, r[1]), G(c, r[0])))
  G.defvjp(lambda x, dy: (G(x, dy), (x, dy)), lambda r, c: (D(r[1], c), F(r[0], c)))
  return F, D, G


def _fold_or_map(name, op, axis_size, in_batched, a, b):
  """F and D: a batched activation with a shared kernel folds into the batch
  dimension (one plain conv); anything else loops over the candidates on CPU.
  Elsewhere (GPU) lax's own batching (grouped convs) is kept."""
  if jax.default_backend() != "cpu":
    axes = tuple(0 if bat else None for bat in in_batched)
    return jax.vmap(op.fun, in_axes=axes)(a, b), True
  if name in ("F", "D") and in_batched[0] and not in_batched[1]:
    y = op(a.reshape((-1,) + a.shape[2:]), b)
    return y.reshape((axis_size, -1) + y.shape[1:]), True
  return _map_candidates(op, axis_size, in_batched, a, b)


# Output phase p (0: even, 1: odd pixels) of a stride-2 4-tap transposed conv
# is a 2-tap conv of the 1-padded input starting at offset p, with these taps.
_PHASE_TAPS = (np.array([0, 2]), np.array([1, 3]))


def deconv2x(x_BxHxWxC, k_4x4xCxO):
  """The stride-2, 4x4, SAME transposed conv (= flax's nn.ConvTranspose) as one
  2x2 conv per output phase (even/odd rows x columns), interleaved."""
  b, h, w, _ = x_BxHxWxC.shape
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = []
  for py in range(2):
    cols = [conv2d(xp[:, py:py + h + 1, px:px + w + 1],
                   k_4x4xCxO[_PHASE_TAPS[py]][:, _PHASE_TAPS[px]], 1, 0) for px in range(2)]
    rows.append(jnp.stack(cols, axis=3))  # B x H x W x 2(px) x O
  y = jnp.stack(rows, axis=2)  # B x H x 2(py) x W x 2(px) x O
  return y.reshape(b, 2 * h, 2 * w, k_4x4xCxO.shape[-1])


def conv2d(x_BxHxWxC, k_KxKxCxO, stride: int, pad: int):
  """A plain NHWC conv (no bias) with lax's values and gradients (all orders).

  Small layers (`uses_matmul`) run as an im2col matmul, which `jax.vmap` over
  per-candidate kernels turns into a batched matmul; larger ones run lax's conv,
  whose vmap over candidate kernels loops over the candidates (`_lax_ops`).

  Args:
    x_BxHxWxC: input activations.
    k_KxKxCxO: kernel (HWIO).
    stride, pad: ints; pad pixels on each side.
  Returns:
    B x Ho x Wo x O, Ho = (H + 2 pad - K) // stride + 1.
  """
  if uses_matmul(x_BxHxWxC.shape, k_KxKxCxO.shape, stride, pad):
    return matmul_conv(x_BxHxWxC, k_KxKxCxO, stride, pad)
  F, _, _ = _lax_ops(tuple(x_BxHxWxC.shape), tuple(k_KxKxCxO.shape), stride, pad)
  return F(x_BxHxWxC, k_KxKxCxO)


class Conv(nn.Module):
  """`nn.Conv(features, (k, k), (s, s), padding=pad, use_bias=False)` (same
  parameter name, shape and init) computed by `conv2d`."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0  # pixels on each side ("VALID" = 0)

  @nn.compact
  def __call__(self, x_BxHxWxC):
    k = self.param("kernel", nn.initializers.lecun_normal(),
                   (self.kernel_size, self.kernel_size, x_BxHxWxC.shape[-1], self.features))
    return conv2d(x_BxHxWxC, k, self.strides, self.padding)


_conv = lambda feat, k, s, p: Conv(feat, k, s, 0 if p == "VALID" else p)


class ConvTranspose(nn.Module):
  """Unsup3D's two transposed convs, numerically equal to flax's
  `nn.ConvTranspose(feat, (4, 4), (s, s), padding="SAME" if s == 2 else "VALID",
  use_bias=False)`, with the same parameter (kernel 4x4xCinxCout, same name and
  init, so checkpoints are interchangeable), computed without input dilation:
    s=2: one 2x2 conv per output phase (even/odd rows x columns), interleaved;
         XLA:CPU runs the input-dilated conv that flax lowers to 8-11x slower
         (forward + backward, bench_train.py --layers), and XLA's FLOP count of it
         includes the multiplications with the inserted zeros.
    s=1 on a 1x1 input (the 1 -> 4 bottleneck): a matmul with the flipped kernel.
  """
  features: int
  strides: int

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cin = x_BxHxWxC.shape[-1]
    k = self.param("kernel", nn.initializers.lecun_normal(), (4, 4, cin, self.features))
    b, h, w, _ = x_BxHxWxC.shape
    if self.strides == 1:
      if (h, w) != (1, 1):
        raise ValueError("ConvTranspose(strides=1) expects a 1x1 input")
      flipped = k[::-1, ::-1].transpose(2, 0, 1, 3).reshape(cin, -1)
      return (x_BxHxWxC.reshape(b, cin) @ flipped).reshape(b, 4, 4, self.features)
    return deconv2x(x_BxHxWxC, k)


_deconv = lambda feat, k, s: ConvTranspose(feat, s)


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
