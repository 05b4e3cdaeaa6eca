"""The image input every scorer checks: uint8 RGB arrays (N, H, W, 3).

A leaf of :mod:`resalign.scorers`: the Fréchet scorer, its Inception feature extractor and the
classifier scorers import it, and it imports none of them.
"""

from __future__ import annotations

import numpy as np

from resalign.errors import DataError


def check_images(images: np.ndarray) -> np.ndarray:
    """``images`` as uint8 (N, H, W, 3), or a DataError naming the problem."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"images must be a uint8 (N, H, W, 3) RGB array, got {images.dtype} {images.shape}"
        )
    return images
