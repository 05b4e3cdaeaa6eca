"""Statistics of measured figures: mean, standard error of the mean, bootstrap confidence intervals.

The paper reports every main figure as the mean over three independent fine-tuning runs (Sec. 4.1,
"Implementation Details") and draws the standard error of the mean as the error area of its curves
(Fig. 2, 4, 7). Across seeds, :func:`mean_sem` is the statistic of every ``report.json`` row; it
equals ``numpy.mean`` and ``scipy.stats.sem`` (``ddof=1``). Within one evaluation, a rate over N
images also gets a binomial standard error and a seeded bootstrap interval (:func:`rate_stats`), so a
single-seed figure still says how many images it rests on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation with ddof=1, over √n).

    One value has no spread to estimate: its SEM is reported as 0 (the row's ``n`` says it is one
    value); no value gives (nan, nan).
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(values) / n
    if n == 1:
        return m, 0.0
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


@dataclass(frozen=True)
class RateStats:
    """A rate k/n over binary outcomes with its binomial SEM and a bootstrap interval."""

    rate: float
    k: int
    n: int
    sem: float
    ci_low: float
    ci_high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_ci(
    outcomes: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``outcomes`` (seeded, reproducible)."""
    x = np.asarray(outcomes, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):
        stop = min(start + 256, resamples)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def rate_stats(
    flags: Sequence[bool] | np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> RateStats:
    """The rate of ``True`` among ``flags`` with binomial SEM √(p(1−p)/n) and a bootstrap interval."""
    x = np.asarray(flags, dtype=bool).ravel()
    n = int(x.size)
    k = int(x.sum())
    if n == 0:
        return RateStats(math.nan, 0, 0, math.nan, math.nan, math.nan, confidence)
    p = k / n
    sem = math.sqrt(p * (1 - p) / n)
    lo, hi = bootstrap_ci(x.astype(np.float64), resamples=resamples, confidence=confidence, seed=seed)
    return RateStats(p, k, n, sem, lo, hi, confidence)

