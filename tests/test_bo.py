"""Bayesian optimisation over orderings: kernel, GP vs brute force, EI vs Monte
Carlo, lambda fitting, the optimise loop, argument checks, the plot."""
import numpy as np
import pytest
from PIL import Image

from scr_jax import bo, search
from scr_jax.errors import UserError
from scr_jax.structure import ALL_ORDERS

X = list(ALL_ORDERS)
HIDDEN = "DLAV"


def footrule(a, b):
  """Independent footrule: positions via dicts, float64."""
  pa = {f: i for i, f in enumerate(a)}
  pb = {f: i for i, f in enumerate(b)}
  return float(sum(abs(pa[f] - pb[f]) for f in "VDLA"))


def toy(order):
  """A smooth-ish, non-trivial function of the ordering."""
  p = np.array([order.index(f) for f in "VDLA"], np.float64)
  return float(p @ [1.0, -2.0, 0.5, 3.0] + np.cos(2.0 * p[0] * p[2]))


def test_positions_and_distance():
  np.testing.assert_array_equal(bo.positions("DVAL"), [1, 0, 3, 2])
  # VDLA -> DVAL swaps V<->D and L<->A: 1 + 1 + 1 + 1.
  assert bo.distance_matrix(["VDLA"], ["DVAL"])[0, 0] == 4
  # Reversal: |0-3| + |1-2| + |2-1| + |3-0| = 8, the maximum.
  assert bo.distance_matrix("VDLA", "ALDV")[0, 0] == 8
  d = bo.distance_matrix(X, X)
  assert d.shape == (24, 24) and d.max() == 8
  ref = np.array([[footrule(a, b) for b in X] for a in X])
  np.testing.assert_array_equal(d, ref)


@pytest.mark.parametrize("lam", [0.01, 0.3, 1.0, 5.0])
def test_kernel_symmetric_unit_diag_psd(lam):
  k = bo.kernel(X, X, lam)
  np.testing.assert_allclose(k, k.T, atol=0)
  np.testing.assert_allclose(np.diag(k), 1.0, atol=1e-15)
  assert np.linalg.eigvalsh(k).min() >= -1e-9
  assert k[X.index("VDLA"), X.index("DVAL")] == pytest.approx(np.exp(-4 * lam))


def test_gp_posterior_matches_brute_force():
  lam, noise = 0.5, 1e-2
  obs = ["VDLA", "DVAL", "ALDV", "LADV", "VLAD", "DLAV", "AVDL", "LVAD", "DAVL"]
  y = np.array([toy(o) for o in obs])
  mean, std = bo.gp_posterior(obs, y, X, lam, noise)

  # Brute force: joint Gaussian of (f(all 24), y_obs) in standardised units,
  # conditioned through the inverse of the full joint covariance (precision).
  mu, s = y.mean(), y.std()
  z = (y - mu) / s
  pts = X + obs
  k = np.exp(-lam * np.array([[footrule(a, b) for b in pts] for a in pts]))
  k[24:, 24:] += noise * np.eye(len(obs))
  prec = np.linalg.inv(k)
  cov_q = np.linalg.inv(prec[:24, :24])
  mean_q = -cov_q @ prec[:24, 24:] @ z
  np.testing.assert_allclose(mean, mu + s * mean_q, atol=1e-6, rtol=0)
  np.testing.assert_allclose(std, s * np.sqrt(np.diag(cov_q)), atol=1e-6, rtol=0)

  # Tiny noise: the posterior interpolates the observations.
  mean, std = bo.gp_posterior(obs, y, X, lam, noise=1e-10)
  at = [X.index(o) for o in obs]
  np.testing.assert_allclose(mean[at], y, atol=1e-4)
  assert std[at].max() < 1e-3 * y.std()
  off = [i for i in range(24) if i not in at]
  assert std[off].min() > 0.05 * y.std()


def test_expected_improvement_vs_monte_carlo():
  rng = np.random.default_rng(0)
  eps = rng.standard_normal(200_000)
  mean = np.array([0.0, 1.0, 2.0, -0.5, 0.3])
  std = np.array([1.0, 0.5, 2.0, 0.2, 1.5])
  best, xi = 0.8, 0.1
  ei = bo.expected_improvement(mean, std, best, xi)
  mc = np.array([np.maximum(best - xi - (m + sd * eps), 0).mean() for m, sd in zip(mean, std)])
  np.testing.assert_allclose(ei, mc, rtol=1e-2)
  # Deterministic points: 0 unless the mean itself improves.
  ei0 = bo.expected_improvement(np.array([1.0, 0.8, 0.5]), np.zeros(3), 0.8)
  np.testing.assert_allclose(ei0, [0.0, 0.0, 0.3], atol=1e-15)


def test_fit_lam_prefers_large_lam_for_rough_functions():
  for seed in range(4):
    rng = np.random.default_rng(seed)
    fitted = []
    for lam in (0.1, 3.0):  # GP draws: smooth, then nearly independent values
      f = np.linalg.cholesky(bo.kernel(X, X, lam) + 1e-9 * np.eye(24)) @ rng.standard_normal(24)
      fitted.append(bo.fit_lam(X, f)[0])
    assert fitted[0] < 0.5 < fitted[1], (seed, fitted)
  # The likelihood really is maximal at the returned grid point.
  y = np.array([toy(o) for o in X])
  lam, noise = bo.fit_lam(X, y, noise_grid=bo.NOISE_GRID)
  best = bo.log_marginal_likelihood(X, y, lam, noise)
  for g in bo.LAM_GRID:
    for n in bo.NOISE_GRID:
      assert bo.log_marginal_likelihood(X, y, g, n) <= best + 1e-12


def test_propose_skips_evaluated_and_batches():
  obs = ["VDLA", "DVAL", "ALDV", "LADV"]
  y = [toy(o) for o in obs]
  picks, ei = bo.propose(obs, y, k=5)
  assert len(picks) == len(set(picks)) == 5 and not set(picks) & set(obs)
  assert ei.shape == (5,) and np.all(ei >= 0)
  # The first pick is the plain argmax of EI.
  lam, noise = bo.fit_lam(obs, y, noise_grid=bo.NOISE_GRID)
  rest = [o for o in X if o not in obs]
  m, s = bo.gp_posterior(obs, y, rest, lam, noise)
  ref = bo.expected_improvement(m, s, min(y))
  assert picks[0] == rest[int(np.argmax(ref))]
  assert ei[0] == pytest.approx(ref.max())
  # Fewer unevaluated candidates than k: all of them.
  picks, _ = bo.propose(X[:22], [toy(o) for o in X[:22]], k=5)
  assert sorted(picks) == sorted(X[22:])


def _table():
  """Footrule distance to HIDDEN plus small fixed noise (optimum stays HIDDEN)."""
  noise = 0.1 * np.random.default_rng(123).standard_normal(24)
  return {o: footrule(o, HIDDEN) + noise[i] for i, o in enumerate(X)}


def test_optimise_beats_random_search():
  table = _table()
  assert min(table, key=table.get) == HIDDEN
  seeds, n_evals = range(8), 12
  bo_hits = 0
  for seed in seeds:
    calls = []

    def evaluate(orders):
      calls.append(list(orders))
      return [table[o] for o in orders]

    res = bo.optimise(evaluate, n_init=4, n_evals=n_evals, seed=seed, log=None)
    orders = [t["order"] for t in res["trace"]]
    assert len(orders) == n_evals == len(set(orders))
    assert [len(c) for c in calls] == [4] + [1] * (n_evals - 4)
    assert [t["ei"] is None for t in res["trace"]] == [True] * 4 + [False] * (n_evals - 4)
    assert res["best_objective"] == min(t["objective"] for t in res["trace"])
    bo_hits += res["best_order"] == HIDDEN
  rand_hits = sum(
      HIDDEN in [X[i] for i in np.random.default_rng(s).choice(24, n_evals, replace=False)]
      for s in seeds)
  assert bo_hits >= rand_hits and bo_hits >= 7, (bo_hits, rand_hits)


def test_optimise_batches_and_exhausts(tmp_path):
  table = _table()
  calls, lines = [], []

  def evaluate(orders):
    calls.append(len(orders))
    return [table[o] for o in orders]

  res = bo.optimise(evaluate, n_init=4, n_evals=12, batch=3, seed=1, log=lines.append)
  assert calls == [4, 3, 3, 2]
  orders = [t["order"] for t in res["trace"]]
  assert len(set(orders)) == 12
  assert [t["round"] for t in res["trace"]] == [0] * 4 + [1] * 3 + [2] * 3 + [3] * 2
  assert len(lines) == 12 and "objective=" in lines[-1]

  res = bo.optimise(evaluate, n_init=2, n_evals=24, batch=5, seed=0, log=None)
  assert sorted(t["order"] for t in res["trace"]) == sorted(X)
  assert res["best_order"] == HIDDEN

  for name, exhaustive in [("bo.png", table), ("bo_plain.png", None)]:
    search.plot_bo_trace(res, str(tmp_path / name), exhaustive=exhaustive)
    with Image.open(tmp_path / name) as im:
      assert im.format == "PNG" and im.size[0] > 100


@pytest.mark.parametrize("kwargs, name", [
    ({"n_init": 0}, "n_init"),
    ({"n_init": 5, "n_evals": 4}, "n_evals"),
    ({"n_evals": 25}, "n_evals"),
    ({"batch": 0}, "batch"),
    ({"n_init": 2.0}, "n_init"),
])
def test_optimise_validates_arguments(kwargs, name):
  with pytest.raises(UserError, match=name):
    bo.optimise(lambda orders: [0.0] * len(orders), log=None, **kwargs)
