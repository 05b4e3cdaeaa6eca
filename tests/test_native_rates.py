"""Rate statistics: SEM vs scipy, bootstrap interval vs an independent re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from resalign import _native
from resalign.errors import NativeError, NumericalError, ShapeError
from resalign.metrics import summarize_rates

MASK = (1 << 64) - 1


class Xoshiro256:
    """Pure-Python xoshiro256** seeded by SplitMix64 (Blackman & Vigna), with Lemire's bounded
    draw: the generator the kernel documents, written independently as the test oracle."""

    def __init__(self, seed: int) -> None:
        z, self.s = seed, []
        for _ in range(4):
            z = (z + 0x9E3779B97F4A7C15) & MASK
            x = z
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
            self.s.append(x ^ (x >> 31))

    @staticmethod
    def _rotl(x: int, k: int) -> int:
        return ((x << k) | (x >> (64 - k))) & MASK

    def next(self) -> int:
        s = self.s
        result = (self._rotl((s[1] * 5) & MASK, 7) * 9) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self._rotl(s[3], 45)
        return result

    def below(self, n: int) -> int:
        m = self.next() * n
        if (m & MASK) < n:
            threshold = (-n % (1 << 64)) % n
            while (m & MASK) < threshold:
                m = self.next() * n
        return m >> 64


def bootstrap_oracle(values, n_boot, seed, confidence):
    rng = Xoshiro256(seed)
    n = len(values)
    means = []
    for _ in range(n_boot):
        total = 0.0
        for _ in range(n):
            total += values[rng.below(n)]
        means.append(total / n)
    alpha = 1 - confidence
    return np.asarray(means), np.quantile(means, [alpha / 2, 1 - alpha / 2])


def test_sem_and_mean_match_scipy_and_numpy():
    values = np.array([0.12, 0.08, 0.15, 0.11, 0.09, 0.2, 0.05])
    s = summarize_rates(values)
    assert s.mean == pytest.approx(values.mean(), rel=1e-15)
    assert s.sem == pytest.approx(scipy.stats.sem(values), rel=1e-13)
    assert s.n == 7


def test_bootstrap_interval_equals_independent_oracle():
    values = [0.3, 0.1, 0.25, 0.4, 0.05]
    means, (lo, hi) = bootstrap_oracle(values, 300, seed=1234, confidence=0.9)
    np.testing.assert_allclose(
        _native.bootstrap_means(np.asarray(values), n_boot=300, seed=1234), means, rtol=0, atol=1e-15
    )
    s = summarize_rates(values, confidence=0.9, n_boot=300, seed=1234)
    assert (s.ci_low, s.ci_high) == pytest.approx((lo, hi), rel=1e-14)


def test_reproducible_from_seed_and_sensible():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.1, 0.3, size=20)
    a = summarize_rates(values, seed=7)
    assert a == summarize_rates(values, seed=7)
    b = summarize_rates(values, seed=8)
    assert (a.ci_low, a.ci_high) != (b.ci_low, b.ci_high)
    assert a.ci_low < a.mean < a.ci_high
    # percentile bootstrap of a mean ≈ mean ± 1.96 · sd/√n (ddof 0) for a moderate n
    half = 1.96 * values.std() / np.sqrt(len(values))
    assert a.ci_high - a.ci_low == pytest.approx(2 * half, rel=0.1)


def test_single_value_and_errors():
    s = summarize_rates([0.4])
    assert np.isnan(s.sem) and s.ci_low == s.ci_high == 0.4
    with pytest.raises(ShapeError, match="empty"):
        summarize_rates([])
    with pytest.raises(NumericalError, match="NaN"):
        summarize_rates([0.1, float("nan")])
    with pytest.raises(NativeError, match="confidence"):
        summarize_rates([0.1, 0.2], confidence=1.5)
