"""Paired comparisons of an arm against its control, and the verdict rule every table states.

An arm (a method, a loss, a structure) and its control train on the same labels with the same
seed; the seed pairs them. What a comparison reports, per arm and value of the swept
parameter, over the n paired seeds:

- the mean paired difference of the test score (arm - control) and its SD;
- its 95 % t interval (and the 90 % one's upper bound, for the "no gain" rule);
- a bootstrap 95 % interval over seeds *and* test images: each replicate draws the seeds with
  replacement and, within each drawn pair, the test images with replacement (the same images
  for both sides), so it carries the test set's sampling noise too, which the t interval over
  seed means does not;
- the two-sided p-value of the paired t test;
- the paired seeds that 80 % power (two-sided alpha 0.05) needs for a true difference of
  ``MARGIN`` at the observed SD.

The verdict rule, stated once (docs/design.md, "Comparisons and verdicts"):

- **better**: the 95 % interval's lower bound is above 0;
- **worse**: its upper bound is below 0;
- **no gain of 0.03**: the 90 % interval's upper bound is below 0.03;
- otherwise **inconclusive**, with about how many more paired seeds 80 % power would need.

The t interval decides (it is the test the seeds were paired for); the bootstrap interval is
reported beside it. Pure numpy/scipy: the sweep's comparisons table and bench scripts both
call ``compare``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

MARGIN = 0.03  # the smallest difference in DSC worth reporting
POWER = 0.8
ALPHA = 0.05
BOOTSTRAP = 2000
MAX_SEEDS = 10_000  # beyond this, "about N more seeds" says nothing useful


@dataclass(frozen=True)
class Comparison:
    """One arm against its control over ``n`` paired seeds (fields in module docstring order)."""

    n: int
    arm_mean: float
    control_mean: float
    mean_diff: float
    sd_diff: float
    ci95_low: float
    ci95_high: float
    ci90_high: float
    boot95_low: float
    boot95_high: float
    p_value: float
    seeds_for_power: int  # paired seeds for 80 % power at MARGIN; -1 where the SD is unknown
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def t_interval(differences: Sequence[float], level: float) -> tuple[float, float]:
    """The two-sided ``level`` t interval of the mean of paired differences (NaN for n < 2)."""
    d = np.asarray(differences, float)
    if len(d) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def seeds_for_power(sd: float, margin: float = MARGIN, power: float = POWER, alpha: float = ALPHA) -> int:
    """The fewest paired seeds n at which a two-sided paired t test of level ``alpha`` detects a
    true mean difference ``margin`` with probability ``power``, for differences of SD ``sd``
    (the noncentral t). -1 where ``sd`` is not a positive number; MAX_SEEDS at most."""
    if not (sd > 0 and math.isfinite(sd)):
        return -1
    for n in range(2, MAX_SEEDS):
        df, nc = n - 1, margin / (sd / math.sqrt(n))
        critical = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc) >= power:
            return n
    return MAX_SEEDS


def bootstrap_interval(arm_images: Sequence[np.ndarray], control_images: Sequence[np.ndarray],
                       level: float = 0.95, replicates: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of the mean paired difference, resampling seeds and, within each
    drawn pair, test images (the same images for arm and control). arm_images[i],
    control_images[i]: the per-image test scores of the i-th pair's two runs, image for image."""
    pairs = [np.asarray(a, float) - np.asarray(c, float) for a, c in zip(arm_images, control_images)]
    if len(pairs) < 2 or any(len(p) == 0 for p in pairs):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(replicates)
    for r in range(replicates):
        drawn = rng.integers(0, len(pairs), len(pairs))
        means[r] = np.mean([pairs[i][rng.integers(0, len(pairs[i]), len(pairs[i]))].mean() for i in drawn])
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def verdict(ci95: tuple[float, float], ci90_high: float, n_needed: int, n: int, margin: float = MARGIN) -> str:
    """The rule of the module docstring, as the sentence a table prints."""
    low, high = ci95
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    if ci90_high < margin:
        return f"no gain of {margin:g}"
    if n_needed < 0:
        return "inconclusive: too few paired seeds for an interval"
    more = max(n_needed - n, 1)
    return f"inconclusive: about {more} more paired seed{'s' if more > 1 else ''}"


def compare(arm: Sequence[float], control: Sequence[float],
            arm_images: Sequence[np.ndarray] | None = None, control_images: Sequence[np.ndarray] | None = None,
            margin: float = MARGIN, seed: int = 0) -> Comparison:
    """An arm's test scores against its control's, pair by pair (the i-th of each share a seed).
    arm_images / control_images: each pair's per-image scores, for the bootstrap (NaN without)."""
    a, c = np.asarray(arm, float), np.asarray(control, float)
    if a.shape != c.shape or a.ndim != 1:
        raise ValueError(f"arm and control must be paired 1-D scores, got shapes {a.shape} and {c.shape}")
    d = a - c
    n = len(d)
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    ci95, ci90 = t_interval(d, 0.95), t_interval(d, 0.90)
    if n >= 2 and sd > 0:
        p = float(stats.ttest_rel(a, c).pvalue)
    else:
        p = math.nan
    boot = (bootstrap_interval(arm_images, control_images, seed=seed) if arm_images is not None
            and control_images is not None else (math.nan, math.nan))
    needed = seeds_for_power(sd, margin)
    return Comparison(
        n=n, arm_mean=float(a.mean()) if n else math.nan, control_mean=float(c.mean()) if n else math.nan,
        mean_diff=float(d.mean()) if n else math.nan, sd_diff=sd, ci95_low=ci95[0], ci95_high=ci95[1],
        ci90_high=ci90[1], boot95_low=boot[0], boot95_high=boot[1], p_value=p, seeds_for_power=needed,
        verdict=verdict(ci95, ci90[1], needed, n, margin) if n >= 2 else
        "inconclusive: too few paired seeds for an interval")
