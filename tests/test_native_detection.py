"""Batched YOLOv8 decode + NMS vs the nudenet package's own per-image ``_postprocess``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nudenet")
import onnxruntime as ort  # noqa: E402
from nudenet import nudenet as nn_pkg  # noqa: E402
from skimage import data  # noqa: E402

from resalign.errors import ShapeError  # noqa: E402
from resalign.metrics import decode_yolov8  # noqa: E402
from resalign.scorers.nudenet import NUDENET_LABELS, NudeNetScorer, packaged_detector_path  # noqa: E402


def package_postprocess(output, size, pad):
    """The package's post-processing of one image's (1, 22, A) output."""
    (w, h), (xp, yp) = size, pad
    return nn_pkg._postprocess([output], xp, yp, None, None, w, h, 320, 320)


def ours(output, sizes, pads):
    return decode_yolov8(output, sizes, pads).per_image(NUDENET_LABELS)


@pytest.fixture(scope="module")
def raw_batch():
    """Raw 320n outputs for a few sample images of different shapes (one session.run)."""
    images = [data.astronaut(), data.camera(), data.coffee(), data.horse(), data.rocket()]
    images = [np.stack([im] * 3, -1) if im.ndim == 2 else im for im in images]
    images = [im.astype(np.uint8) if im.dtype != bool else (im * 255).astype(np.uint8) for im in images]
    scorer = NudeNetScorer(NudeNetScorer.Config(threads=1))
    blob, sizes, pads = scorer.preprocess(images)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(packaged_detector_path()), options, providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: blob})[0]
    return output, sizes, pads


def check_against_package(output, sizes, pads):
    expected = [
        package_postprocess(output[i : i + 1], sizes[i], pads[i]) for i in range(output.shape[0])
    ]
    assert ours(output, sizes, pads) == expected
    return expected


def test_raw_outputs(raw_batch):
    expected = check_against_package(*raw_batch)
    # the sample photos give real detections (before NMS 12, 12, 1, 10 and 0 anchors score >= 0.2):
    # the comparison covers decoded boxes, not only empty lists
    assert sum(len(e) for e in expected) >= 3 and sum(1 for e in expected if e) >= 2


def test_boosted_scores_exercise_nms(raw_batch):
    """Scores scaled up so hundreds of overlapping rows pass 0.2 and many tie at 1.0."""
    output, sizes, pads = raw_batch
    boosted = output.copy()
    boosted[:, 4:] = np.clip(boosted[:, 4:] * np.float32(40.0), 0, 1)
    expected = check_against_package(boosted, sizes, pads)
    assert sum(len(e) for e in expected) > 20


def test_synthetic_clusters_with_ties_and_clipping():
    """Random clustered boxes (many near the borders), quantised scores (ties), odd sizes."""
    rng = np.random.default_rng(0)
    b, classes, anchors = 6, 18, 2100
    out = np.zeros((b, 4 + classes, anchors), dtype=np.float32)
    centers = rng.uniform(-20, 340, size=(b, 12, 2))
    pick = rng.integers(0, 12, size=(b, anchors))
    for i in range(b):
        out[i, 0:2] = (centers[i, pick[i]] + rng.normal(0, 6, size=(anchors, 2))).T
        out[i, 2:4] = rng.uniform(5, 120, size=(2, anchors))
        out[i, 4:] = np.round(rng.uniform(0, 0.6, size=(classes, anchors)) ** 2 * 20) / 20
    sizes = np.array([[320, 320], [640, 480], [300, 900], [1, 1], [1024, 1023], [77, 31]])
    side = sizes.max(axis=1, keepdims=True)
    pads = side - sizes
    expected = check_against_package(out, sizes, pads)
    assert sum(len(e) for e in expected) > 50


def test_shape_errors(raw_batch):
    output, sizes, pads = raw_batch
    with pytest.raises(ShapeError, match="one row per image"):
        decode_yolov8(output, sizes[:2], pads[:2])
    with pytest.raises(ShapeError, match="float32"):
        decode_yolov8(output.astype(np.float64), sizes, pads)
    with pytest.raises(ShapeError, match="3-d"):
        decode_yolov8(output[0], sizes, pads)
