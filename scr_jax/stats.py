"""Small-sample statistics for the reproduction's tables, in NumPy only (no SciPy:
it is not a requirement of this project).

- `t_cdf` / `t_ppf`: Student's t distribution, through the regularised
  incomplete beta function (`betainc`, Lentz's continued fraction).
- `paired_difference`: mean of a - b over paired samples (seeds), its 95 %
  t interval and two-sided p-value.
- `holm`: Holm's step-down adjusted p-values over a family; `holm_intervals`:
  intervals at the adjusted levels, consistent with Holm's decisions (the
  interval excludes 0 exactly when Holm rejects).
- `mean_std`, `spearman` (ties get their average rank).
"""
from __future__ import annotations

import math

import numpy as np


def betainc(a: float, b: float, x: float) -> float:
  """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1.

  Continued fraction (modified Lentz), evaluated on the side where it
  converges fast (x < (a + 1) / (a + b + 2)), else by the symmetry
  I_x(a, b) = 1 - I_{1-x}(b, a). Accurate to ~1e-12 for the small a, b used
  here (a = df / 2, b = 1 / 2).

  Raises:
    ValueError: a or b not positive, or x outside [0, 1].
  """
  if a <= 0 or b <= 0:
    raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
  if not 0.0 <= x <= 1.0:
    raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
  if x == 0.0 or x == 1.0:
    return x
  if x > (a + 1.0) / (a + b + 2.0):
    return 1.0 - betainc(b, a, 1.0 - x)
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  tiny, eps = 1e-300, 1e-15
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  f = d
  for m in range(1, 500):
    for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + num * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + num / c
      c = c if abs(c) > tiny else tiny
      f *= c * d
    if abs(c * d - 1.0) < eps:
      break
  return math.exp(log_front) * f / a


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with df > 0 degrees of freedom."""
  if df <= 0:
    raise ValueError(f"t_cdf needs df > 0, got {df}")
  if math.isinf(t):
    return 1.0 if t > 0 else 0.0
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
  return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
  """The t with t_cdf(t, df) = p, 0 < p < 1 (bisection on the monotone cdf,
  to ~1e-12 relative)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"t_ppf needs 0 < p < 1, got {p}")
  if p == 0.5:
    return 0.0
  if p < 0.5:
    return -t_ppf(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, hi * 2.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-12 * max(1.0, hi):
      break
  return 0.5 * (lo + hi)


def mean_std(xs) -> tuple:
  """(mean, sample standard deviation with ddof=1; 0.0 for a single value)."""
  x = np.asarray(xs, np.float64)
  if x.size == 0:
    raise ValueError("mean_std of no values")
  return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def paired_difference(a, b, alpha: float = 0.05) -> dict:
  """The paired mean difference d = a - b (same seeds in the same order).

  Returns dict(n, mean, sd (ddof=1), se, df, t, p (two-sided), lo, hi (the
  1 - alpha t interval of the mean difference), alpha). With n = 1, or all
  differences equal (sd 0), the interval is the point itself and p is 0 for
  a non-zero constant difference, 1 for an identically zero one; with n < 2
  t, p, lo, hi are NaN unless sd is 0.

  Raises:
    ValueError: a and b of different lengths, or empty.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"paired_difference needs two equal-length 1-d samples, got {a.shape} "
                     f"and {b.shape}")
  d = a - b
  n = d.size
  mean = float(d.mean())
  sd = float(d.std(ddof=1)) if n > 1 else float("nan")
  out = dict(n=n, mean=mean, sd=sd, df=n - 1, alpha=alpha)
  if n > 1 and sd > 0:
    se = sd / math.sqrt(n)
    t = mean / se
    half = t_ppf(1.0 - alpha / 2.0, n - 1) * se
    out.update(se=se, t=t, p=2.0 * t_cdf(-abs(t), n - 1), lo=mean - half, hi=mean + half)
  elif n > 1:  # every seed moved by exactly the same amount
    out.update(se=0.0, t=math.copysign(math.inf, mean) if mean else 0.0,
               p=0.0 if mean else 1.0, lo=mean, hi=mean)
  else:
    out.update(se=float("nan"), t=float("nan"), p=float("nan"), lo=float("nan"),
               hi=float("nan"))
  return out


def holm(pvals) -> list:
  """Holm's step-down adjusted p-values, in the input order.

  Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1,
  (m - j + 1) p_(j)). Rejecting where adj <= alpha controls the family-wise
  error at alpha. NaN p-values are kept as NaN and do not count in m.
  """
  p = np.asarray(pvals, np.float64)
  ok = np.flatnonzero(~np.isnan(p))
  adj = np.full(p.shape, np.nan)
  m = ok.size
  running = 0.0
  for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adj[i] = running
  return adj.tolist()


def holm_levels(pvals, alpha: float = 0.05) -> list:
  """Per hypothesis, the significance level Holm tests it at, in input order.

  Ranked by p, hypothesis i (0-based) gets alpha / (m - i) while every
  earlier one was rejected; from the first non-rejection on, all remaining
  ones get that first non-rejected level (Holm stops there). An interval at
  level 1 - a_i then excludes 0 exactly when Holm rejects hypothesis i (a t
  interval excludes 0 iff its p <= a_i). NaN p-values get NaN.
  """
  p = np.asarray(pvals, np.float64)
  ok = np.flatnonzero(~np.isnan(p))
  levels = np.full(p.shape, np.nan)
  m = ok.size
  stopped = None
  for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
    level = alpha / (m - rank) if stopped is None else stopped
    if stopped is None and p[i] > level:
      stopped = level
    levels[i] = level
  return levels.tolist()


def holm_intervals(pairs, alpha: float = 0.05) -> list:
  """Holm over a family of paired comparisons.

  pairs: a list of (a, b) paired samples. Returns per pair the
  `paired_difference` dict plus p_holm (adjusted p), level (Holm's level for
  it, `holm_levels`), holm_lo / holm_hi (the 1 - level interval) and
  rejected (holm_lo > 0 or holm_hi < 0, which agrees with p_holm <= alpha).
  """
  res = [paired_difference(a, b, alpha) for a, b in pairs]
  ps = [r["p"] for r in res]
  for r, padj, lev in zip(res, holm(ps), holm_levels(ps, alpha)):
    if math.isnan(lev):
      r.update(p_holm=float("nan"), level=float("nan"), holm_lo=float("nan"),
               holm_hi=float("nan"), rejected=False)
      continue
    if r["se"] > 0:
      half = t_ppf(1.0 - lev / 2.0, r["df"]) * r["se"]
    else:
      half = 0.0
    lo, hi = r["mean"] - half, r["mean"] + half
    r.update(p_holm=padj, level=lev, holm_lo=lo, holm_hi=hi, rejected=bool(lo > 0 or hi < 0))
  return res


def ranks(x) -> np.ndarray:
  """1-based ranks, ties given their average rank (float64, same length)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(x.size, np.float64)
  xs = x[order]
  i = 0
  while i < x.size:
    j = i
    while j + 1 < x.size and xs[j + 1] == xs[i]:
      j += 1
    r[order[i:j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  return r


def spearman(x, y) -> float:
  """Spearman's rank correlation: Pearson's correlation of the (tie-averaged)
  ranks. NaN when either sample is constant.

  Raises:
    ValueError: samples of different lengths or fewer than 2 values.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or x.size < 2:
    raise ValueError(f"spearman needs two equal-length 1-d samples of >= 2 values, got "
                     f"{x.shape} and {y.shape}")
  rx, ry = ranks(x) - (x.size + 1) / 2.0, ranks(y) - (y.size + 1) / 2.0
  den = math.sqrt(float(rx @ rx) * float(ry @ ry))
  return float(rx @ ry) / den if den > 0 else float("nan")
