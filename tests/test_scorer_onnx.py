"""The ``onnx-classifier`` scorer vs a numpy oracle of the same tiny classifier."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from resalign.errors import ConfigError, MissingWeightsError
from resalign.scorers.onnx_classifier import SCORERS, OnnxClassifierScorer

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 2)).astype(np.float32) * 4
B = np.array([0.1, -0.2], dtype=np.float32)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def write_classifier(path):
    """GlobalAveragePool over H, W -> Flatten -> Gemm (3 -> 2 logits)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def oracle_probability(images, bgr=False):
    x = images.astype(np.float64) / 255.0
    if bgr:
        x = x[..., ::-1]
    x = (x - np.array(MEAN)) / np.array(STD)
    logits = x.mean(axis=(1, 2)) @ W.astype(np.float64) + B
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True))[:, 1]


@pytest.fixture
def model(tmp_path):
    return write_classifier(tmp_path / "clf.onnx")


def make(model, **extra):
    opts = {"model": str(model), "input_size": 8, "mean": MEAN, "std": STD, "threads": 1, "batch_size": 5}
    return OnnxClassifierScorer.make({**opts, **extra})


def test_probabilities_and_rate_equal_oracle(model):
    images = np.random.default_rng(1).integers(0, 256, size=(13, 8, 8, 3), dtype=np.uint8)
    scorer = make(model)
    probs = scorer.probabilities(images)
    np.testing.assert_allclose(probs, oracle_probability(images), rtol=1e-5)
    result = scorer.score(images)
    assert result.metric == "unsafe_rate"
    assert result.value == pytest.approx(np.mean(oracle_probability(images) > 0.5))
    assert [r["unsafe"] for r in result.per_image] == list(oracle_probability(images) > 0.5)
    assert 0 < result.value < 1  # both outcomes occur
    bgr = make(model, channel_order="BGR").probabilities(images)
    np.testing.assert_allclose(bgr, oracle_probability(images, bgr=True), rtol=1e-5)


def test_sigmoid_and_threshold(model):
    images = np.random.default_rng(2).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    x = (images.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    logit = (x.mean(axis=(1, 2)) @ W.astype(np.float64) + B)[:, 1]
    scorer = make(model, activation="sigmoid", threshold=0.7)
    np.testing.assert_allclose(scorer.probabilities(images), 1 / (1 + np.exp(-logit)), rtol=1e-5)
    assert scorer.score(images).details["threshold"] == 0.7


def test_missing_model_and_bad_options(model, tmp_path):
    images = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(MissingWeightsError, match="'model'"):
        OnnxClassifierScorer.make({}).score(images)
    with pytest.raises(MissingWeightsError, match="not found"):
        OnnxClassifierScorer.make({"model": str(tmp_path / "nope.onnx")}).score(images)
    with pytest.raises(ConfigError, match="activation"):
        OnnxClassifierScorer.make({"activation": "relu"})
    with pytest.raises(ConfigError, match="unsafe_index"):
        make(model, unsafe_index=5).score(images)
    assert SCORERS == (OnnxClassifierScorer,)
