"""The paired comparison and its verdict rule (bonescan_model.paired) on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bonescan_model.paired import compare, seeds_for_power, t_interval, verdict


def test_the_t_interval_of_three_differences():
    low, high = t_interval([0.1, 0.2, 0.3], 0.95)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert (low, high) == pytest.approx((0.2 - half, 0.2 + half))
    assert all(math.isnan(v) for v in t_interval([0.1], 0.95))


@pytest.mark.parametrize("ci95, ci90_high, needed, n, expected", [
    ((0.001, 0.05), 0.045, 8, 6, "better"),
    ((-0.05, -0.001), -0.005, 8, 6, "worse"),
    ((-0.02, 0.029), 0.025, 8, 6, "no gain of 0.03"),
    ((-0.02, 0.06), 0.05, 20, 6, "inconclusive: about 14 more paired seeds"),
    ((-0.02, 0.06), 0.05, 5, 6, "inconclusive: about 1 more paired seed"),
])
def test_the_verdict_rule(ci95, ci90_high, needed, n, expected):
    assert verdict(ci95, ci90_high, needed, n) == expected


def test_seeds_for_power_reach_80_percent_in_simulation():
    sd = 0.045
    n = seeds_for_power(sd)
    assert n == 20  # the ~0.045 paired SD seen in bench/RESULTS.md: 20 seeds for +0.03

    def simulated_power(n: int) -> float:
        rng = np.random.default_rng(0)
        d = rng.normal(0.03, sd, size=(20_000, n))
        return float(np.mean(stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05))

    assert simulated_power(n) == pytest.approx(0.8, abs=0.02)
    assert simulated_power(n - 4) < 0.78
    assert seeds_for_power(0.0) == -1 and seeds_for_power(float("nan")) == -1


def test_compare_against_scipy_and_a_constant_bootstrap():
    arm, control = [0.40, 0.35, 0.42, 0.38], [0.36, 0.34, 0.37, 0.35]
    # Per-image scores whose difference is 0.05 on every image of every pair.
    images = [np.linspace(0.1, 0.9, 7) for _ in arm]
    result = compare(arm, control, [i + 0.05 for i in images], images)
    d = np.subtract(arm, control)
    assert result.n == 4 and result.mean_diff == pytest.approx(d.mean())
    assert result.sd_diff == pytest.approx(d.std(ddof=1))
    assert result.p_value == pytest.approx(stats.ttest_rel(arm, control).pvalue)
    assert (result.boot95_low, result.boot95_high) == pytest.approx((0.05, 0.05))
    assert result.verdict == "better" and result.ci95_low > 0
    assert math.isnan(compare(arm, control).boot95_low)  # no per-image scores: no bootstrap
    with pytest.raises(ValueError, match="paired"):
        compare([0.1, 0.2], [0.1])
