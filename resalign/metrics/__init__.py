"""Metric kernels for evaluation, backed by the Rust extension :mod:`resalign._native`.

- :mod:`resalign.metrics.frechet`: Fréchet distance, streaming feature statistics, ``.npz`` stats
  files compatible with pytorch-fid's ``--save-stats``;
- :mod:`resalign.metrics.detection`: batched YOLOv8 decode + NMS (NudeNet 320n);
- :mod:`resalign.metrics.stats`: mean, SEM and bootstrap interval of per-seed rates.

Every function here calls ``_native``; there is no second implementation to fall back to (the
pure numpy references live in the tests, as oracles).
"""

from __future__ import annotations

from resalign.metrics.detection import Detections, decode_yolov8
from resalign.metrics.frechet import (
    FeatureAccumulator,
    FeatureStats,
    frechet_distance,
    frechet_from_features,
)
from resalign.metrics.stats import RateSummary, summarize_rates

__all__ = [
    "Detections",
    "FeatureAccumulator",
    "FeatureStats",
    "RateSummary",
    "decode_yolov8",
    "frechet_distance",
    "frechet_from_features",
    "summarize_rates",
]
