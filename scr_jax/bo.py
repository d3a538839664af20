"""Bayesian optimisation over the 24 causal orderings of (V, D, L, A).

Paper Sec. 4.2: a GP over permutations with the kernel
  K(p1, p2) = exp(-lam * sum_i |p1^-1(i) - p2^-1(i)|),
p^-1(i) = position of factor i in the ordering (Spearman footrule distance),
and expected improvement (EI) to pick the next orderings to train. The
objective (validation loss or MAD) is MINIMISED.

Only 24 points exist, so everything is exact float64 numpy (Cholesky on at
most 24x24 matrices); no JAX needed.

GP conventions: y is standardised internally (z = (y - mean(y)) / std(y), std
taken as 1 when y is constant or has one element), the prior on z has constant
mean 0 and unit amplitude (the kernel is 1 on the diagonal), and `noise` is the
observation-noise variance in those standardised units. Posterior mean/std are
returned in the original units of y and describe the latent function (no
noise added), so std -> 0 at observed points as noise -> 0.
"""
from __future__ import annotations

import math

import numpy as np

from scr_jax.config import FACTORS
from scr_jax.errors import UserError
from scr_jax.structure import ALL_ORDERS, check_order

LAM_GRID = tuple(np.logspace(-2, 1, 31))  # 0.01 .. 10
NOISE_GRID = (1e-6, 1e-4, 1e-2, 1e-1)


def _as_orders(orders):
  """A single ordering string or a sequence of them -> list of strings."""
  if isinstance(orders, str):
    orders = [orders]
  return [check_order(o) for o in orders]


def positions(order: str) -> np.ndarray:
  """int[4]: position of each factor (V, D, L, A) in `order`; "DVAL" -> [1, 0, 3, 2]."""
  order = check_order(order)
  return np.array([order.index(f) for f in FACTORS], np.int64)


def distance_matrix(orders_a, orders_b) -> np.ndarray:
  """int[Na, Nb] footrule distances sum_i |pos_a(i) - pos_b(i)| (even, 0..8)."""
  pa = np.stack([positions(o) for o in _as_orders(orders_a)])  # Na x 4
  pb = np.stack([positions(o) for o in _as_orders(orders_b)])  # Nb x 4
  return np.abs(pa[:, None, :] - pb[None, :, :]).sum(-1)


def kernel(orders_a, orders_b, lam: float) -> np.ndarray:
  """float64[Na, Nb] exp(-lam * footrule distance)."""
  return np.exp(-float(lam) * distance_matrix(orders_a, orders_b).astype(np.float64))


def _standardise(y):
  y = np.asarray(y, np.float64).reshape(-1)
  mu = float(y.mean())
  s = float(y.std()) if y.size > 1 else 0.0
  if not s > 1e-12:
    s = 1.0  # constant data: keep the scale, only shift
  return (y - mu) / s, mu, s


def _chol(x_orders, lam, noise):
  """Lower Cholesky factor of K(X, X) + noise I, X = x_orders (n)."""
  k = kernel(x_orders, x_orders, lam)
  return np.linalg.cholesky(k + float(noise) * np.eye(len(k)))


def _posterior_z(x_orders, z, query_orders, lam, noise):
  """Posterior of the standardised latent f at the queries: (mean[Q], var[Q])."""
  l = _chol(x_orders, lam, noise)
  alpha = np.linalg.solve(l.T, np.linalg.solve(l, z))  # (K + noise I)^-1 z
  ks = kernel(x_orders, query_orders, lam)  # n x Q
  v = np.linalg.solve(l, ks)  # n x Q
  mean = ks.T @ alpha
  var = np.maximum(1.0 - (v * v).sum(0), 0.0)  # prior variance k(q, q) = 1
  return mean, var


def gp_posterior(x_orders, y, query_orders, lam, noise=1e-6):
  """GP posterior (mean[Q], std[Q]) in the units of y at `query_orders`.

  x_orders: n evaluated orderings, y: n objectives. See the module docstring
  for the standardisation and what `noise` means.
  """
  x = _as_orders(x_orders)
  z, mu, s = _standardise(y)
  if len(x) != len(z):
    raise ValueError(f"{len(x)} orderings but {len(z)} objectives")
  mean, var = _posterior_z(x, z, _as_orders(query_orders), lam, noise)
  return mu + s * mean, s * np.sqrt(var)


def log_marginal_likelihood(x_orders, y, lam, noise) -> float:
  """log p(z | X, lam, noise) of the standardised y.

  Standardising shifts the log likelihood of y by -n log std(y), the same for
  every (lam, noise), so maximising this also maximises the likelihood of y.
  """
  x = _as_orders(x_orders)
  z, _, _ = _standardise(y)
  l = _chol(x, lam, noise)
  w = np.linalg.solve(l, z)
  return float(-0.5 * w @ w - np.log(np.diag(l)).sum() - 0.5 * len(z) * math.log(2 * math.pi))


def fit_lam(x_orders, y, grid=LAM_GRID, noise_grid=(1e-6,)):
  """(lam, noise) maximising the marginal likelihood over grid x noise_grid.

  Pass noise_grid=NOISE_GRID to fit the noise as well (noisy objectives such
  as validation losses). Ties (e.g. a single observation) go to the first,
  i.e. smoothest, lam.
  """
  best = (-math.inf, float(grid[0]), float(noise_grid[0]))
  for noise in noise_grid:
    for lam in grid:
      ll = log_marginal_likelihood(x_orders, y, lam, noise)
      if ll > best[0] + 1e-12:
        best = (ll, float(lam), float(noise))
  return best[1], best[2]


def _norm_cdf(z):
  return np.vectorize(lambda t: 0.5 * math.erfc(-t / math.sqrt(2.0)), otypes=[np.float64])(z)


def expected_improvement(mean, std, best, xi=0.0) -> np.ndarray:
  """E[max(best - xi - f, 0)] for f ~ N(mean, std^2), elementwise (minimisation).

  With std = 0 this is the deterministic max(best - xi - mean, 0), so 0 when
  mean >= best - xi.
  """
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  imp = best - xi - mean
  pos = std > 1e-12
  safe = np.where(pos, std, 1.0)
  z = imp / safe
  ei = imp * _norm_cdf(z) + safe * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
  return np.where(pos, np.maximum(ei, 0.0), np.maximum(imp, 0.0))


def propose(x_orders, y, k=1, candidates=ALL_ORDERS, lam=None, noise=None, xi=0.0):
  """The k unevaluated candidates with the highest EI: (orders[k'], ei[k']).

  k' = min(k, number of unevaluated candidates). lam/noise default to
  `fit_lam` (noise fitted over NOISE_GRID when both are None). For k > 1 the
  "kriging believer" heuristic: after each pick, add it as a fake observation
  equal to its posterior mean (hyperparameters and standardisation kept) and
  recompute EI for the next pick; `best` then also counts the fake values.
  The EI reported for later picks is thus conditional on earlier ones.
  """
  x = _as_orders(x_orders)
  z, _, scale = _standardise(y)
  if lam is None or noise is None:
    fl, fn = fit_lam(x, y, noise_grid=NOISE_GRID if noise is None else (noise,))
    lam = fl if lam is None else lam
    noise = fn if noise is None else noise
  pool = [o for o in _as_orders(candidates) if o not in x]
  picks, eis = [], []
  for _ in range(min(k, len(pool))):
    mean, var = _posterior_z(x, z, pool, lam, noise)
    ei = expected_improvement(mean, np.sqrt(var), float(z.min()), xi)
    i = int(np.argmax(ei))
    picks.append(pool[i])
    eis.append(float(ei[i]) * scale)  # standardised -> units of y
    x = x + [pool[i]]
    z = np.append(z, mean[i])
    pool = pool[:i] + pool[i + 1:]
  return picks, np.array(eis)


def _check_int(name, value, lo, hi=None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise UserError(f"{name} must be an integer, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise UserError(f"{name} must be {rng}, got {value}")


def optimise(evaluate_batch, n_init=4, n_evals=10, batch=1, seed=0, log=print):
  """BO over the orderings, minimising `evaluate_batch(list of orders) -> list of floats`.

  Round 0 evaluates n_init distinct random orderings (one call); each later
  round fits (lam, noise) by marginal likelihood, proposes up to `batch`
  unevaluated orderings by EI and evaluates them in one call, until n_evals
  evaluations (or all 24). Returns {"trace": [{"round", "order", "objective",
  "ei", "lam"}...], "best_order", "best_objective"}; ei/lam are None in round 0.
  """
  _check_int("n_init", n_init, 1)
  _check_int("n_evals", n_evals, 1, len(ALL_ORDERS))
  if n_evals < n_init:
    raise UserError(f"n_evals must be >= n_init ({n_init}), got {n_evals}")
  _check_int("batch", batch, 1)
  log = log or (lambda *_: None)
  rng = np.random.default_rng(seed)
  trace = []

  def run(r, orders, eis, lam):
    ys = [float(v) for v in evaluate_batch(list(orders))]
    if len(ys) != len(orders):
      raise ValueError(f"evaluate_batch returned {len(ys)} values for {len(orders)} orderings")
    for o, v, e in zip(orders, ys, eis):
      if not math.isfinite(v):
        raise ValueError(f"objective of ordering {o} is {v}; BO needs finite values")
      trace.append({"round": r, "order": o, "objective": v, "ei": e, "lam": lam})
      ei_s = "" if e is None else f" ei={e:.3g} lam={lam:.3g}"
      log(f"bo round {r}: {o} objective={v:.6g}{ei_s}")

  init = [ALL_ORDERS[i] for i in rng.choice(len(ALL_ORDERS), n_init, replace=False)]
  run(0, init, [None] * n_init, None)
  r = 0
  while len(trace) < n_evals and len(trace) < len(ALL_ORDERS):
    r += 1
    xs = [t["order"] for t in trace]
    ys = [t["objective"] for t in trace]
    lam, noise = fit_lam(xs, ys, noise_grid=NOISE_GRID)
    orders, eis = propose(xs, ys, k=min(batch, n_evals - len(trace)), lam=lam, noise=noise)
    run(r, orders, [float(e) for e in eis], lam)
  best = min(trace, key=lambda t: t["objective"])
  return {"trace": trace, "best_order": best["order"], "best_objective": best["objective"]}
