"""structure.mix: how parents' embeddings enter a child (paper Eq. 3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scr_jax import config, structure
from scr_jax.errors import UserError

# V -> D, V -> L, D -> A: rows parents, columns children (V, D, L, A).
M = np.zeros((4, 4), np.float32)
M[0, 1] = M[0, 2] = M[1, 3] = 1.0


def _u(seed=0, b=3, d=5):
  u = np.random.default_rng(seed).uniform(0, 1, (b, 4, d)).astype(np.float32)
  return u * np.array([1.0, 3.0, 0.5, 2.0], np.float32)[None, :, None]  # unequal scales


def test_sum_adds_the_parents_embeddings():
  u = _u()
  got = np.asarray(structure.mix(jnp.asarray(u), jnp.asarray(M)))
  want = u.copy()
  want[:, 1] += u[:, 0]
  want[:, 2] += u[:, 0]
  want[:, 3] += u[:, 1]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_balanced_gives_each_parent_the_childs_norm():
  u = _u()
  got = np.asarray(structure.mix(jnp.asarray(u), jnp.asarray(M), "balanced"))
  n = np.linalg.norm(u, axis=-1)
  for g, f in ((0, 1), (0, 2), (1, 3)):
    parent_part = got[:, f] - u[:, f]
    np.testing.assert_allclose(np.linalg.norm(parent_part, axis=-1), n[:, f], rtol=1e-5)
    np.testing.assert_allclose(parent_part, u[:, g] * (n[:, f] / n[:, g])[:, None], rtol=1e-5)
  np.testing.assert_array_equal(got[:, 0], u[:, 0])  # V has no parent


@pytest.mark.parametrize("scale", ["sum", "balanced"])
def test_no_edges_leave_the_embeddings_exactly(scale):
  u = jnp.asarray(_u(1))
  for m in (jnp.zeros((4, 4)), jnp.zeros((3, 4, 4))):  # shared, and per image
    np.testing.assert_array_equal(np.asarray(structure.mix(u, m, scale)), np.asarray(u))


def test_balanced_per_image_matrix_and_gradient_treats_the_ratio_as_constant():
  u = jnp.asarray(_u(2))
  m_b = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (3, 4, 4)) * np.triu(np.ones(4), 1),
                    jnp.float32)
  n = jnp.linalg.norm(u, axis=-1)
  ratio = np.asarray(n[:, None, :] / n[:, :, None])
  np.testing.assert_allclose(np.asarray(structure.mix(u, m_b, "balanced")),
                             np.asarray(structure.mix(u, m_b * ratio)), rtol=1e-5)
  w = jnp.asarray(np.random.default_rng(4).normal(size=u.shape), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(w * structure.mix(x, m_b, "balanced")))(u)
  g_const = jax.grad(lambda x: jnp.sum(w * structure.mix(x, m_b * ratio)))(u)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_const), rtol=1e-5, atol=1e-6)


def test_unknown_mix_scale_is_a_user_error():
  with pytest.raises(UserError, match="mix_scale"):
    structure.mix(jnp.asarray(_u()), jnp.asarray(M), "mean")
  with pytest.raises(UserError, match="mix_scale"):
    config.validate(config.override(config.get_config("test_tiny"), ["mix_scale=mean"]))


def test_parent_norms_measure_the_own_and_the_parents_parts():
  u = _u(5)
  own, par = structure.parent_norms(u, M)
  np.testing.assert_allclose(own, np.linalg.norm(u, axis=-1).mean(0), rtol=1e-5)
  want = [0.0, np.linalg.norm(u[:, 0], axis=-1).mean(), np.linalg.norm(u[:, 0], axis=-1).mean(),
          np.linalg.norm(u[:, 1], axis=-1).mean()]
  np.testing.assert_allclose(par, want, rtol=1e-5)
  _, par_bal = structure.parent_norms(u, M, "balanced")  # each parent at the child's norm
  np.testing.assert_allclose(par_bal[1:], own[1:], rtol=1e-5)
  assert par_bal[0] == 0.0


def test_without_parent_grad_the_child_reads_the_parents_but_does_not_train_them():
  u, m = jnp.asarray(_u(6)), jnp.asarray(M)
  np.testing.assert_array_equal(np.asarray(structure.mix(u, m, parent_grad=False)),
                                np.asarray(structure.mix(u, m)))
  # a loss on the children D, L, A only: their own embeddings get gradient, the
  # parents' (V for D and L, D for A) only through their own slot
  def loss(x, mm, pg):
    return jnp.sum(structure.mix(x, mm, parent_grad=pg)[:, 1:] ** 2)
  g_with = np.asarray(jax.grad(loss)(u, m, True))
  g_without = np.asarray(jax.grad(loss)(u, m, False))
  assert np.abs(g_with[:, 0]).max() > 0 and np.abs(g_without[:, 0]).max() == 0  # V: parent only
  np.testing.assert_allclose(g_without[:, 2:], g_with[:, 2:], rtol=1e-6)  # L, A: not parents
  # ... while M itself still learns (the unrolled searches' outer gradient)
  gm_with, gm_without = (np.asarray(jax.grad(loss, argnums=1)(u, m, pg)) for pg in (True, False))
  np.testing.assert_allclose(gm_without, gm_with, rtol=1e-6)
  assert np.abs(gm_without).max() > 0
