"""Post-processing of YOLOv8-style detector outputs (NudeNet 320n), batched.

:func:`decode_yolov8` wraps :func:`resalign._native.decode_yolov8`, which reproduces the nudenet
package's ``_postprocess`` for every image of a batch in one call: rows whose top class score is
≥ 0.2, boxes decoded back to original-image pixels through the bottom/right square padding,
class-agnostic ``cv2.dnn.NMSBoxes`` (score 0.25, IoU 0.45), boxes truncated to int.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from resalign import _native
from resalign.errors import ShapeError


@dataclass(frozen=True)
class Detections:
    """Kept detections of a batch, flat: row k belongs to image ``image[k]``.

    ``box`` rows are [x, y, w, h] in original-image pixels; within an image, rows are in NMS order
    (descending score).
    """

    image: np.ndarray  # int64 (K,)
    class_id: np.ndarray  # int64 (K,)
    score: np.ndarray  # float32 (K,)
    box: np.ndarray  # int64 (K, 4)
    n_images: int

    def per_image(self, labels: Sequence[str]) -> list[list[dict[str, Any]]]:
        """Per image, the detections as the nudenet package returns them:
        ``{"class": label, "score": float, "box": [x, y, w, h]}``."""
        out: list[list[dict[str, Any]]] = [[] for _ in range(self.n_images)]
        for i, c, s, b in zip(
            self.image.tolist(), self.class_id.tolist(), self.score.tolist(), self.box.tolist()
        ):
            out[i].append({"class": labels[c], "score": s, "box": b})
        return out


def decode_yolov8(
    output: np.ndarray,
    sizes: np.ndarray,
    pads: np.ndarray,
    *,
    model_size: tuple[int, int] = (320, 320),
    conf_threshold: float = 0.2,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
) -> Detections:
    """Decode + NMS of ``output`` (B, 4 + C, A) float32.

    ``sizes``: (B, 2) original [width, height]; ``pads``: (B, 2) [x_pad, y_pad] added at the
    right/bottom to make each image square before resizing to ``model_size`` (width, height).
    """
    output = np.asarray(output)
    if output.dtype != np.float32:
        raise ShapeError(f"output must be float32 (the detector's dtype), got {output.dtype}")
    image, class_id, score, box = _native.decode_yolov8(
        output,
        np.asarray(sizes, dtype=np.int64),
        np.asarray(pads, dtype=np.int64),
        model_size=tuple(model_size),
        conf_threshold=conf_threshold,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
    )
    return Detections(image, class_id, score, box, n_images=int(output.shape[0]))
