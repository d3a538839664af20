"""scr_jax.stats against closed forms, textbook tables and hand-computed examples."""
import math

import numpy as np
import pytest

from scr_jax import stats


@pytest.mark.parametrize("t", [-7.0, -1.3, -0.2, 0.0, 0.4, 1.0, 3.5, 40.0])
def test_t_cdf_closed_forms(t):
  # df = 1 is Cauchy: 1/2 + atan(t)/pi; df = 2: 1/2 + t / (2 sqrt(2 + t^2)).
  assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
  assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_cdf_large_df_is_normal():
  phi = 0.5 * (1 + math.erf(1.5 / math.sqrt(2)))
  assert stats.t_cdf(1.5, 1e6) == pytest.approx(phi, abs=1e-6)


@pytest.mark.parametrize("df,q", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (10, 2.228),
                                  (30, 2.042)])
def test_t_ppf_textbook_975(df, q):
  # Two-sided 95 % critical values from any t table (3 decimals).
  assert stats.t_ppf(0.975, df) == pytest.approx(q, abs=6e-4)
  assert stats.t_ppf(0.025, df) == pytest.approx(-q, abs=6e-4)
  assert stats.t_cdf(stats.t_ppf(0.975, df), df) == pytest.approx(0.975, abs=1e-10)


def test_betainc_symmetric_and_uniform():
  assert stats.betainc(1, 1, 0.3) == pytest.approx(0.3)  # Beta(1, 1) is uniform
  assert stats.betainc(2, 3, 0.4) == pytest.approx(1 - stats.betainc(3, 2, 0.6), abs=1e-12)
  # I_x(2, 2) = 3x^2 - 2x^3
  assert stats.betainc(2, 2, 0.7) == pytest.approx(3 * 0.49 - 2 * 0.343, abs=1e-12)
  with pytest.raises(ValueError):
    stats.betainc(0, 1, 0.5)


def test_paired_difference_hand_computed():
  # d = [1, 1, 2, 2, 3]: mean 1.8, sd sqrt(0.7), se sqrt(0.7 / 5), t = 1.8 / se = 4.8107;
  # CI 1.8 +- 2.776445 se = [0.76115, 2.83885].
  r = stats.paired_difference([1, 2, 3, 4, 5], [0, 1, 1, 2, 2])
  se = math.sqrt(0.7 / 5)
  assert r["mean"] == pytest.approx(1.8)
  assert r["sd"] == pytest.approx(math.sqrt(0.7))
  assert r["t"] == pytest.approx(1.8 / se)
  assert r["lo"] == pytest.approx(0.76115, abs=1e-4)
  assert r["hi"] == pytest.approx(2.83885, abs=1e-4)
  # Two-sided p of t = 4.8107 at df 4: between 0.005 and 0.01 (t table: 4.604 / 5.598
  # are the 0.01 / 0.005 two-sided critical values).
  assert 0.005 < r["p"] < 0.01
  assert r["p"] == pytest.approx(2 * stats.t_cdf(-1.8 / se, 4))


def test_paired_difference_p_matches_interval():
  rng = np.random.default_rng(0)
  for _ in range(20):
    a = rng.normal(size=5)
    b = a + rng.normal(0.5, 1.0, size=5)
    r = stats.paired_difference(a, b)
    assert (r["p"] < 0.05) == (r["hi"] < 0 or r["lo"] > 0)


def test_paired_difference_degenerate():
  r = stats.paired_difference([3.0, 4.0], [2.0, 3.0])  # constant difference 1
  assert (r["lo"], r["hi"], r["p"]) == (1.0, 1.0, 0.0)
  r = stats.paired_difference([3.0], [2.0])
  assert r["mean"] == 1.0 and math.isnan(r["p"])
  with pytest.raises(ValueError):
    stats.paired_difference([1, 2], [1, 2, 3])


def test_holm_adjusted_hand_computed():
  # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1, max -> 0.06)
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
  adj = stats.holm([0.01, float("nan"), 0.02])
  assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)


def test_holm_levels_stop_at_first_acceptance():
  # m = 4: 0.005 <= 0.05/4 rejected; 0.01 <= 0.05/3 rejected; 0.03 > 0.05/2: stop, so 0.04
  # is tested at 0.025 too.
  assert stats.holm_levels([0.01, 0.04, 0.03, 0.005]) == pytest.approx(
      [0.05 / 3, 0.025, 0.025, 0.0125])


def test_holm_intervals_agree_with_adjusted_p():
  rng = np.random.default_rng(1)
  for _ in range(10):
    base = rng.normal(size=5)
    pairs = [(base + rng.normal(shift, 0.5, size=5), base) for shift in (0.0, 0.4, 1.0, -1.5)]
    for r in stats.holm_intervals(pairs):
      assert r["rejected"] == (r["p_holm"] <= 0.05)
      # the Holm interval is never narrower than the unadjusted one
      assert r["holm_lo"] <= r["lo"] + 1e-12 and r["holm_hi"] >= r["hi"] - 1e-12


def test_mean_std():
  assert stats.mean_std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx((5.0, math.sqrt(32 / 7)))
  assert stats.mean_std([3.0]) == (3.0, 0.0)


def test_spearman():
  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 24 / 120
  assert stats.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
  # ties: ranks of y = [1.5, 1.5, 3, 4]; Pearson of ranks = 4.5 / sqrt(5 * 4.5)
  assert stats.spearman([1, 2, 3, 4], [1, 1, 2, 3]) == pytest.approx(4.5 / math.sqrt(22.5))
  assert stats.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
  assert math.isnan(stats.spearman([1, 2, 3], [1, 1, 1]))
  assert stats.ranks([10, 30, 20, 30]).tolist() == [1.0, 3.5, 2.0, 3.5]
