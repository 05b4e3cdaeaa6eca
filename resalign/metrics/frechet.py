"""Fréchet distance between Gaussian fits of two feature sets, and the feature statistics.

FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}, computed in float64 by
:func:`resalign._native.frechet_distance` (Cholesky of Σ1, or its eigendecomposition when Σ1 is
singular; eigenvalues of the symmetric Lᵀ Σ2 L). It equals pytorch-fid's
``calculate_frechet_distance`` without its ``scipy.linalg.sqrtm`` cost.

Statistics are :class:`FeatureStats` (``mu``, ``sigma`` = ``numpy.cov(features, rowvar=False)``),
built by streaming batches through :class:`FeatureAccumulator` and stored as ``.npz`` files with
keys ``mu`` and ``sigma``, the format pytorch-fid writes with ``--save-stats`` and reads back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resalign import _native
from resalign.errors import DataError, ShapeError

#: Streaming mean/covariance accumulator (Rust): ``update(batch)``, ``merge(other)``,
#: ``mean()``, ``covariance()``, picklable for sharded evaluation.
FeatureAccumulator = _native.FeatureAccumulator


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    threads: int | None = None,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``threads``: threads of the dense kernels (default: ``RESALIGN_NATIVE_THREADS`` or 1; 0 = all
    cores). Raises :class:`~resalign.errors.ShapeError` on mismatched shapes and
    :class:`~resalign.errors.NumericalError` on NaN/inf or a non-covariance ``sigma``.
    """
    return float(
        _native.frechet_distance(
            _as_float(mu1, "mu1"),
            _as_float(sigma1, "sigma1"),
            _as_float(mu2, "mu2"),
            _as_float(sigma2, "sigma2"),
            threads=threads,
        )
    )


def _as_float(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a float32/float64 array (other numeric dtypes are converted to float64)."""
    arr = np.asarray(x)
    if arr.dtype in (np.float32, np.float64):
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ShapeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64)


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of a feature set: ``mu`` (d,), ``sigma`` (d, d) unbiased, ``count`` samples.

    ``count`` is ``None`` for statistics read from files that do not record it (pytorch-fid's).
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ShapeError(
                f"FeatureStats needs mu of shape (d,) and sigma of shape (d, d); "
                f"got {mu.shape} and {sigma.shape}"
            )
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_accumulator(cls, acc: FeatureAccumulator) -> FeatureStats:
        """Mean and unbiased covariance of everything folded into ``acc`` (needs ≥ 2 samples)."""
        return cls(mu=acc.mean(), sigma=acc.covariance(), count=int(acc.count))

    @classmethod
    def from_features(
        cls, features: np.ndarray | Iterable[np.ndarray], *, threads: int | None = None
    ) -> FeatureStats:
        """Statistics of an (n, d) feature array, or of an iterable of (n_i, d) batches."""
        batches = [features] if isinstance(features, np.ndarray) else features
        acc: FeatureAccumulator | None = None
        for batch in batches:
            batch = _as_float(batch, "features")
            if batch.ndim != 2:
                raise ShapeError(f"features must be (n, d) arrays, got shape {batch.shape}")
            if acc is None:
                acc = FeatureAccumulator(batch.shape[1])
            acc.update(batch, threads=threads)
        if acc is None:
            raise ShapeError("features is empty: no feature batch was given")
        return cls.from_accumulator(acc)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read an ``.npz`` with keys ``mu`` and ``sigma`` (and optionally ``count``)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"feature statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("mu", "sigma") if k not in f.files]
                if missing:
                    raise DataError(
                        f"{path}: not a feature statistics file (missing key(s) "
                        f"{', '.join(missing)}; found {', '.join(f.files) or 'none'})"
                    )
                count = int(f["count"]) if "count" in f.files else None
                return cls(mu=f["mu"][:], sigma=f["sigma"][:], count=count)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read feature statistics: {exc}") from exc

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma`` (and ``count`` when known) to an ``.npz`` readable by
        pytorch-fid (``np.load(path, allow_pickle=False)['mu']``, ``['sigma']``); returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.count is not None:
            arrays["count"] = np.asarray(self.count, dtype=np.int64)
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    def frechet_distance(self, other: FeatureStats, *, threads: int | None = None) -> float:
        """Fréchet distance between this Gaussian fit and ``other``'s."""
        if other.dim != self.dim:
            raise ShapeError(
                f"feature statistics have different dimensions ({self.dim} and {other.dim}): "
                "they come from different feature extractors"
            )
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, threads=threads)


def frechet_from_features(
    feats_a: np.ndarray, feats_b: np.ndarray, *, threads: int | None = None
) -> float:
    """Fréchet distance between the Gaussian fits (mean, ``numpy.cov``) of two (n, d) feature sets."""
    a = FeatureStats.from_features(feats_a, threads=threads)
    b = FeatureStats.from_features(feats_b, threads=threads)
    return a.frechet_distance(b, threads=threads)
