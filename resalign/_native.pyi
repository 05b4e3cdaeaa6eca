"""Type stub of the Rust extension ``resalign._native`` (rust_metrics/src/lib.rs).

Errors are ``resalign.errors.ShapeError`` (shapes/dtypes), ``resalign.errors.NumericalError``
(NaN/inf, non-PSD covariance) or their base ``resalign.errors.NativeError``.
"""

import numpy as np
import numpy.typing as npt

__version__: str
THREADS_ENV: str
DEFAULT_THREADS: int

def frechet_distance(
    mu1: npt.NDArray[np.floating],
    sigma1: npt.NDArray[np.floating],
    mu2: npt.NDArray[np.floating],
    sigma2: npt.NDArray[np.floating],
    *,
    threads: int | None = None,
) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2} in float64 (float32/float64 inputs)."""

def resolve_threads(threads: int | None = None) -> int:
    """Thread count in effect: argument, else RESALIGN_NATIVE_THREADS, else DEFAULT_THREADS."""

class FeatureAccumulator:
    """Streaming mean/unbiased covariance of feature vectors, mergeable across shards."""

    def __init__(self, dim: int) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def count(self) -> int: ...
    def update(self, batch: npt.NDArray[np.floating], *, threads: int | None = None) -> None: ...
    def merge(self, other: FeatureAccumulator) -> None: ...
    def mean(self) -> npt.NDArray[np.float64]: ...
    def covariance(self) -> npt.NDArray[np.float64]: ...
    def state(self) -> tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
    @staticmethod
    def from_state(
        count: int, mean: npt.NDArray[np.floating], comoment: npt.NDArray[np.floating]
    ) -> FeatureAccumulator: ...
    def __reduce__(self) -> tuple[object, tuple[object, ...]]: ...

def decode_yolov8(
    output: npt.NDArray[np.float32],
    sizes: npt.NDArray[np.integer],
    pads: npt.NDArray[np.integer],
    *,
    model_size: tuple[int, int] = (320, 320),
    conf_threshold: float = 0.2,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]
]:
    """(image_index, class_id, score, box [x, y, w, h]) of the detections kept in a batch."""

def rate_summary(
    values: npt.NDArray[np.floating],
    *,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """(mean, sem, ci_low, ci_high) of per-seed rates."""

def bootstrap_means(
    values: npt.NDArray[np.floating], *, n_boot: int = 10000, seed: int = 0
) -> npt.NDArray[np.float64]:
    """The bootstrap means behind rate_summary, in draw order."""
