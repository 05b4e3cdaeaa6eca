"""Statistics of measured figures: mean and standard error over seeds; a rate's interval over images.

The paper reports every main figure as the mean over three independent fine-tuning runs (Sec. 4.1,
"Implementation Details") and draws the standard error of the mean as the error area of its curves
(Fig. 2, 4, 7). Across seeds, :func:`mean_sem` is the statistic of every ``report.json`` row; it
equals ``numpy.mean`` and ``scipy.stats.sem`` (``ddof=1``). Within one evaluation, a rate over N
images also gets its standard error and a seeded bootstrap interval (:func:`rate_stats`, through the
native kernel :func:`resalign.metrics.summarize_rates`), so a single-seed figure still says how
many images it rests on.

Paired comparisons (:func:`paired_difference`): two methods measured on the same replicates (in
``resalign compare``, the same unlearning seed, hence the same training data, and the same
fine-tuning and generation seed) are compared through the per-replicate differences d_i = a_i − b_i:
their mean, SEM = s_d / √n (s_d the sample standard deviation, ddof=1) and the Student-t interval
mean ± t_{(1+c)/2, n−1} · SEM (scipy's Student t), which treats the n replicates as independent draws.
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
    """A rate k/n over binary per-image outcomes, its SEM and a percentile bootstrap interval."""

    rate: float
    k: int
    n: int
    sem: float
    ci_low: float
    ci_high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def rate_stats(
    flags: Sequence[bool] | np.ndarray, *, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> RateStats:
    """The share of ``True`` among ``flags``, with SEM (ddof=1) and a seeded bootstrap interval."""
    from resalign.metrics import summarize_rates

    x = np.asarray(flags, dtype=bool).ravel()
    if x.size == 0:
        return RateStats(math.nan, 0, 0, math.nan, math.nan, math.nan, confidence)
    s = summarize_rates(x.astype(np.float64), confidence=confidence, n_boot=n_boot, seed=seed)
    return RateStats(s.mean, int(x.sum()), int(x.size), s.sem, s.ci_low, s.ci_high, confidence)


@dataclass(frozen=True)
class PairedDifference:
    """Mean, SEM and Student-t interval of per-replicate differences a_i − b_i."""

    mean: float
    sem: float
    n: int
    df: int
    ci_low: float
    ci_high: float
    confidence: float
    values: tuple[float, ...]

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> PairedDifference:
    """The paired difference a − b over replicates measured alike for both (same length, same order).

    mean d̄, SEM = s_d/√n (ddof=1, as :func:`mean_sem`) and the interval d̄ ± t_{(1+c)/2, n−1}·SEM;
    with fewer than two replicates there is no spread to estimate and the interval is (nan, nan).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)}")
    d = tuple(float(x) - float(y) for x, y in zip(a, b))
    m, s = mean_sem(d)
    n = len(d)
    if n < 2:
        return PairedDifference(m, s, n, 0, math.nan, math.nan, confidence, d)
    from scipy.stats import t as student_t

    h = float(student_t.ppf(0.5 + confidence / 2.0, n - 1)) * s
    return PairedDifference(m, s, n, n - 1, m - h, m + h, confidence, d)
