"""nets.conv2d / nets.ConvTranspose against flax's nn.Conv / nn.ConvTranspose:
values, input and kernel gradients, grad-of-grad (the unrolled search
differentiates through a step), under vmap over per-candidate kernels, on both
of conv2d's paths (im2col matmul and lax conv with its candidate loop), and the
whole cpu_small train step against the same step built from flax's convs."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scr_jax import config, nets as nets_lib, structure, train_step

PATHS = {"matmul": 1 << 30, "lax": 0}  # nets.MATMUL_MAX_PATCH forcing each path


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
  monkeypatch.setattr(nets_lib, "MATMUL_MAX_PATCH", PATHS[request.param])
  return request.param


def _flax_conv(x, k, stride, pad):
  mod = nn.Conv(k.shape[-1], k.shape[:2], (stride, stride), padding=pad, use_bias=False)
  return mod.apply({"params": {"kernel": k}}, x)


def _flax_deconv(x, k, stride):
  mod = nn.ConvTranspose(k.shape[-1], (4, 4), (stride, stride), use_bias=False,
                         padding="SAME" if stride == 2 else "VALID")
  return mod.apply({"params": {"kernel": k}}, x)


def _max_errors(f, ref, x, k):
  """Largest |ours - flax| over the value, dL/dx, dL/dk and the grad-of-grad
  d/dx |dL/dk|^2, each relative to the reference's largest magnitude."""
  w = jax.random.normal(jax.random.PRNGKey(9), ref(x, k).shape)
  loss = lambda g: lambda x, k: jnp.sum(jnp.tanh(g(x, k)) * w)
  meta = lambda g: jax.grad(lambda x: jnp.sum(jax.grad(loss(g), 1)(x, k) ** 2))(x)
  pairs = [(f(x, k), ref(x, k))]
  pairs += list(zip(jax.grad(loss(f), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)))
  pairs.append((meta(f), meta(ref)))
  return [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs]


CONVS = [(5, 8, 3, 1, 1), (5, 40, 3, 1, 1), (3, 36, 4, 2, 1), (5, 8, 4, 2, 1),
         (6, 40, 4, 1, 0), (4, 6, 5, 1, 2)]  # cin, cout, k, stride, pad


@pytest.mark.parametrize("cin,cout,k,stride,pad", CONVS)
def test_conv2d_equals_flax(path, cin, cout, k, stride, pad):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, cin))
  kern = jax.random.normal(jax.random.PRNGKey(1), (k, k, cin, cout)) * 0.3
  assert nets_lib.uses_matmul(x.shape, kern.shape, stride, pad) == (path == "matmul")
  errs = _max_errors(lambda x, k: nets_lib.conv2d(x, k, stride, pad),
                     lambda x, k: _flax_conv(x, k, stride, pad), x, kern)
  assert max(errs) < 1e-5, errs


def test_the_comparison_catches_a_flipped_kernel():
  """The check above can fail: a spatially flipped kernel (a correlation vs a
  convolution mix-up) is far from flax's."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 5))
  kern = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 8)) * 0.3
  errs = _max_errors(lambda x, k: nets_lib.conv2d(x, k[::-1, ::-1], 1, 1),
                     lambda x, k: _flax_conv(x, k, 1, 1), x, kern)
  assert min(errs) > 1e-2, errs


@pytest.mark.parametrize("shared_x", [False, True])
@pytest.mark.parametrize("cin,cout,k,stride,pad", [CONVS[0], CONVS[2], CONVS[4]])
def test_conv2d_vmapped_over_candidate_kernels(path, shared_x, cin, cout, k, stride, pad):
  """vmap over K candidate kernels (and per-candidate or shared activations)
  = each candidate through flax's conv: values, gradients, grad-of-grad."""
  kc = 3
  xs = jax.random.normal(jax.random.PRNGKey(0), (kc, 2, 8, 8, cin))
  ks = jax.random.normal(jax.random.PRNGKey(1), (kc, k, k, cin, cout)) * 0.3
  x_axis = None if shared_x else 0
  x_in = xs[0] if shared_x else xs
  w = jax.random.normal(jax.random.PRNGKey(2), (kc,) + _flax_conv(xs[0], ks[0], stride, pad).shape)

  def per_candidate(conv):
    def loss(x, k, w):
      return jnp.sum(jnp.tanh(conv(x, k, stride, pad)) * w)
    def outs(x, k, w):
      meta = jax.grad(lambda x: jnp.sum(jax.grad(loss, 1)(x, k, w) ** 2))(x)
      return (conv(x, k, stride, pad),) + jax.grad(loss, (0, 1))(x, k, w) + (meta,)
    return outs

  got = jax.vmap(per_candidate(nets_lib.conv2d), in_axes=(x_axis, 0, 0))(x_in, ks, w)
  for i in range(kc):
    want = per_candidate(_flax_conv)(xs[0] if shared_x else xs[i], ks[i], w[i])
    for a, b in zip(got, want):
      np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("strides,hw", [(2, 5), (1, 1)])
def test_conv_transpose_equals_flax_also_vmapped(path, strides, hw):
  """ConvTranspose (phase-wise 2x2 convs through conv2d) = nn.ConvTranspose:
  value, gradients and grad-of-grad, alone and vmapped over candidate kernels."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, hw, hw + 1 if strides == 2 else hw, 6))
  ks = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 6, 7)) * 0.3
  ours = nets_lib.ConvTranspose(7, strides)
  f = lambda x, k: ours.apply({"params": {"kernel": k}}, x)
  ref = lambda x, k: _flax_deconv(x, k, strides)
  assert max(_max_errors(f, ref, x, ks[0])) < 1e-5
  vm = jax.vmap(lambda k: jax.grad(lambda k: jnp.sum(jnp.tanh(f(x, k))))(k))(ks)
  for i in range(2):
    want = jax.grad(lambda k: jnp.sum(jnp.tanh(ref(x, k))))(ks[i])
    np.testing.assert_allclose(vm[i], want, rtol=1e-4, atol=1e-5)


def test_train_step_equals_the_step_with_flax_convs(monkeypatch):
  """The cpu_small networks (32 px: both conv2d paths in use) from the same
  initial state and batch give the same loss and updated parameters as the
  same step built from flax's nn.Conv / nn.ConvTranspose (same parameter tree)."""
  cfg = dataclasses.replace(config.get_config("cpu_small"), batch_size=2)
  st = structure.resolve_structure(cfg)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  used = set()
  orig = nets_lib.uses_matmul
  monkeypatch.setattr(nets_lib, "uses_matmul", lambda *a: used.add(orig(*a)) or orig(*a))
  ours, met = jax.jit(train_step._train_step_fn(nets, cfg))(state, img, st)
  assert used == {True, False}  # both paths took part
  monkeypatch.setattr(nets_lib, "_conv", lambda feat, k, s, p: nn.Conv(
      feat, (k, k), (s, s), padding=p, use_bias=False))
  monkeypatch.setattr(nets_lib, "_deconv", lambda feat, k, s: nn.ConvTranspose(
      feat, (k, k), (s, s), padding="SAME" if s == 2 else "VALID", use_bias=False))
  flax_nets = nets_lib.make_nets(cfg)
  p_flax = flax_nets.init(jax.random.PRNGKey(0), img[:1])
  assert jax.tree_util.tree_structure(p_flax) == jax.tree_util.tree_structure(state.params)
  ref, met_ref = jax.jit(train_step._train_step_fn(flax_nets, cfg))(state, img, st)
  np.testing.assert_allclose(met["loss"], met_ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(met["grad_norm"], met_ref["grad_norm"], rtol=1e-5)
  # Each parameter array's gradient, relative to its largest entry.
  grad = lambda net: jax.jit(jax.grad(lambda p: train_step.loss_fn(p, net, img, st, cfg)[0]))
  g_ours = jax.tree_util.tree_leaves(grad(nets)(state.params))
  g_ref = jax.tree_util.tree_leaves(grad(flax_nets)(state.params))
  for a, b in zip(g_ours, g_ref):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * float(jnp.max(jnp.abs(b)))
  # The updated parameters, relative in norm. Not elementwise: Adam's first move
  # is lr g / (|g| + eps) whatever the gradient's size, so a gradient entry at
  # rounding level can flip its move from +lr to -lr (seen: 0.8 lr on one entry
  # of 32768, and different entries on different runs of the same program).
  diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
      jax.tree_util.tree_leaves(ours.params), jax.tree_util.tree_leaves(ref.params)))
  norm = sum(float(jnp.sum(b ** 2)) for b in jax.tree_util.tree_leaves(ref.params))
  assert diff ** 0.5 <= 1e-4 * norm ** 0.5, (diff ** 0.5, norm ** 0.5)
