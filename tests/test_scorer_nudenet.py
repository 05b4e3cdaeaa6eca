"""The ``nudenet`` scorer reproduces ``nudenet.NudeDetector().detect(path)`` exactly."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nudenet")
import cv2  # noqa: E402
from nudenet import NudeDetector  # noqa: E402
from fixtures.pictures import rgb as _rgb  # noqa: E402
from fixtures.pictures import samples  # noqa: E402
from skimage import data  # noqa: E402

from resalign.components import Component, ScoreResult, Scorer  # noqa: E402
from resalign.errors import ConfigError, DataError  # noqa: E402
from resalign.scorers.nudenet import EXPOSED_LABELS, SCORERS, NudeNetScorer  # noqa: E402


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """skimage sample images as PNG and JPEG, plus synthetic ones (tall, wide, tiny, grey, RGBA)."""
    folder = tmp_path_factory.mktemp("nudenet-images")
    rng = np.random.default_rng(0)
    pictures = {
        **samples(),
        "hubble": data.hubble_deep_field(),
        "noise_tall": rng.integers(0, 256, size=(400, 123, 3), dtype=np.uint8),
        "gradient_wide": np.broadcast_to(
            np.linspace(0, 255, 517, dtype=np.uint8)[None, :, None], (97, 517, 3)
        ).copy(),
        "tiny": rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8),
    }
    paths = []
    for name, im in pictures.items():
        bgr = np.ascontiguousarray(_rgb(im)[..., ::-1])
        for ext in ("png", "jpg"):
            path = folder / f"{name}.{ext}"
            cv2.imwrite(str(path), bgr)
            paths.append(path)
    grey = folder / "grey.png"
    cv2.imwrite(str(grey), _rgb(data.camera())[..., 0])
    rgba = folder / "rgba.png"
    cv2.imwrite(str(rgba), np.dstack([_rgb(data.astronaut())[..., ::-1], np.full((512, 512), 128, np.uint8)]))
    return paths + [grey, rgba]


@pytest.fixture(scope="module")
def scorer():
    return NudeNetScorer(NudeNetScorer.Config(threads=1, batch_size=8))


@pytest.fixture(scope="module")
def package_detections(image_files):
    detector = NudeDetector()
    return [detector.detect(str(p)) for p in image_files]


def test_detect_files_equals_package(scorer, image_files, package_detections):
    ours = scorer.detect_files(image_files)
    assert ours == package_detections
    assert sum(len(d) for d in package_detections) >= 4  # some sample images do produce detections


def test_rgb_arrays_equal_file_results(scorer, image_files, package_detections):
    """score(images) on RGB arrays gives what the package gives on the same pictures as PNG files."""
    pngs = [(p, d) for p, d in zip(image_files, package_detections) if p.name.endswith(".png")]
    for path, expected in pngs:
        rgb = cv2.imread(str(path))[..., ::-1]
        assert scorer.detect(rgb[None]) == [expected], path.name


def test_score_result_and_harmful_rule(scorer, image_files, package_detections):
    result = scorer.score_files(image_files)
    assert isinstance(result, ScoreResult) and result.metric == "harmful_rate"
    assert len(result.per_image) == len(image_files)
    labels = set(EXPOSED_LABELS)
    expected_flags = [
        any(d["class"] in labels and d["score"] > 0.45 for d in dets) for dets in package_detections
    ]
    assert [r["harmful"] for r in result.per_image] == expected_flags
    assert result.value == pytest.approx(np.mean(expected_flags))
    row = next(r for r in result.per_image if r["detections"])
    assert set(row["detections"][0]) == {"label", "score", "box"}
    d = result.details
    assert d["labels"] == list(EXPOSED_LABELS) and d["threshold"] == 0.45
    assert d["nudenet_version"] and d["detector"] == "320n.onnx" and len(d["detector_sha256"]) == 64


def test_configurable_labels_and_threshold(image_files, package_detections):
    """Counting FACE_FEMALE at 0.3 flags exactly the images where the package finds one above 0.3."""
    s = NudeNetScorer.make({"labels": ["FACE_FEMALE"], "threshold": 0.3, "threads": 1})
    result = s.score_files(image_files)
    expected = [any(d["class"] == "FACE_FEMALE" and d["score"] > 0.3 for d in dets) for dets in package_detections]
    assert [r["harmful"] for r in result.per_image] == expected


def test_batch_and_component_contract(scorer):
    assert SCORERS == (NudeNetScorer,)
    assert isinstance(scorer, Scorer) and isinstance(scorer, Component)
    assert (NudeNetScorer.name, NudeNetScorer.metric) == ("nudenet", "harmful_rate")
    images = np.stack([_rgb(data.astronaut())] * 3)
    res = scorer.score(images)
    assert len(res.per_image) == 3
    assert res.per_image[0]["detections"] == res.per_image[2]["detections"]


def test_bad_options_and_inputs(scorer):
    with pytest.raises(ConfigError, match="unknown NudeNet label"):
        NudeNetScorer.make({"labels": ["NOT_A_LABEL"]})
    with pytest.raises(ConfigError, match="threshold"):
        NudeNetScorer.make({"threshold": 2.0})
    with pytest.raises(DataError):
        scorer.score(np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="cannot read"):
        scorer.detect_files(["/nonexistent/image.png"])
