"""Summary of per-seed rates: mean, standard error of the mean and a bootstrap interval.

The kernel is :func:`resalign._native.rate_summary`: SEM = sample standard deviation (ddof 1) /
√n, as ``scipy.stats.sem``; the interval is the percentile bootstrap of the mean from ``n_boot``
resamples drawn with xoshiro256** seeded by ``seed`` (reproducible across platforms), quantiles
by numpy's default linear rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from resalign import _native


@dataclass(frozen=True)
class RateSummary:
    """Mean, SEM and ``confidence`` bootstrap interval of ``n`` per-seed rates."""

    mean: float
    sem: float  # NaN when n == 1
    ci_low: float
    ci_high: float
    n: int
    confidence: float
    n_boot: int
    seed: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mean": self.mean,
            "sem": self.sem,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "confidence": self.confidence,
            "n_boot": self.n_boot,
            "seed": self.seed,
        }


def summarize_rates(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> RateSummary:
    """Mean, SEM and seeded percentile-bootstrap interval of per-seed ``values``."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    mean, sem, lo, hi = _native.rate_summary(arr, confidence=confidence, n_boot=n_boot, seed=seed)
    return RateSummary(
        mean=mean,
        sem=sem,
        ci_low=lo,
        ci_high=hi,
        n=int(arr.shape[0]),
        confidence=confidence,
        n_boot=n_boot,
        seed=seed,
    )
