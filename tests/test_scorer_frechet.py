"""The ``frechet`` scorer: features from ONNX / TorchScript / an injected extractor, reference
statistics from .npz or an image folder (cached), and a MissingWeightsError without weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from resalign.errors import ConfigError, MissingWeightsError
from resalign.metrics import FeatureStats
from resalign.scorers.frechet import (
    SCORERS,
    FrechetScorer,
    ImagePreprocessing,
    frechet_from_features,
)

W = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)  # 3 ch × 4 cells -> 6 feats


def numpy_features(images: np.ndarray) -> np.ndarray:
    """Oracle feature map: [0,1] pixels, 2×2 average pooling on 4×4 images, flattened, times W."""
    x = images.astype(np.float32) / 255.0
    pooled = x.reshape(x.shape[0], 2, 2, 2, 2, 3).mean(axis=(2, 4))  # (N, 2, 2, 3)
    flat = pooled.transpose(0, 3, 1, 2).reshape(x.shape[0], 12)  # channel-major like NCHW
    return flat.astype(np.float64) @ W.astype(np.float64)


def write_onnx(path):
    """ONNX: AveragePool 2×2 -> Flatten -> MatMul W (the same map as numpy_features)."""
    nodes = [
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "W"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-features",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def write_torch(path):
    """The same map as a TorchScript module (.pt) or a torch.export program (.pt2)."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.from_numpy(W))

        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 2).flatten(1) @ self.w

    if path.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(Tiny(), (torch.zeros(2, 3, 4, 4),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.10+
            torch.jit.script(Tiny()).save(str(path))
    return path


def random_images(seed, n):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)


@pytest.fixture
def reference(tmp_path):
    images = random_images(1, 40)
    FeatureStats.from_features(numpy_features(images)).save(tmp_path / "ref.npz")
    return tmp_path / "ref.npz", images


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("name", ["f.onnx", "f.pt", "f.pt2"])
def test_score_equals_oracle(tmp_path, reference, name):
    ref_path, ref_images = reference
    model = write_onnx(tmp_path / name) if name.endswith(".onnx") else write_torch(tmp_path / name)
    scorer = FrechetScorer.make(
        {"feature_model": str(model), "reference": str(ref_path), "batch_size": 7, "threads": 1}
    )
    images = random_images(2, 30)
    result = scorer.score(images)
    expected = frechet_from_features(numpy_features(images), numpy_features(ref_images))
    assert result.metric == "frechet_distance"
    assert result.value == pytest.approx(expected, rel=1e-5)  # float32 features
    assert result.details["feature_dim"] == 6 and result.details["n_images"] == 30
    assert result.details["reference_count"] == 40


def test_reference_folder_is_computed_once_and_cached(tmp_path):
    from PIL import Image

    folder = tmp_path / "refs"
    folder.mkdir()
    ref_images = random_images(3, 12)
    for i, im in enumerate(ref_images):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    cache = tmp_path / "cache"
    options = {
        "feature_model": str(write_onnx(tmp_path / "f.onnx")),
        "reference": str(folder),
        "cache_dir": str(cache),
        "threads": 1,
    }
    images = random_images(4, 10)
    value = FrechetScorer.make(options).score(images).value
    expected = frechet_from_features(numpy_features(images), numpy_features(ref_images))
    assert value == pytest.approx(expected, rel=1e-5)
    cached = list(cache.glob("*.npz"))
    assert len(cached) == 1
    stats = FeatureStats.load(cached[0])
    np.testing.assert_allclose(stats.mu, numpy_features(ref_images).mean(0), rtol=1e-5)
    FrechetScorer._reference_cache.clear()
    assert FrechetScorer.make(options).score(images).value == value


def test_injected_extractor_for_the_toy_world(reference):
    """A feature function given in code (e.g. the toy classifier's) replaces the model file."""
    ref_path, ref_images = reference

    class Features:
        name = "numpy-oracle"

        def __call__(self, images):
            return numpy_features(images)

    scorer = FrechetScorer(FrechetScorer.Config(reference=str(ref_path)), extractor=Features())
    images = random_images(5, 25)
    expected = frechet_from_features(numpy_features(images), numpy_features(ref_images))
    assert scorer.score(images).value == pytest.approx(expected, rel=1e-12)
    assert scorer.score(images).details["features"] == "numpy-oracle"


def test_missing_weights_and_reference(tmp_path, reference):
    ref_path, _ = reference
    with pytest.raises(MissingWeightsError, match="feature_model"):
        FrechetScorer.make({"reference": str(ref_path)}).score(random_images(0, 3))
    with pytest.raises(MissingWeightsError, match="not found"):
        FrechetScorer.make({"feature_model": str(tmp_path / "nope.onnx"), "reference": str(ref_path)}).score(
            random_images(0, 3)
        )
    model = write_onnx(tmp_path / "f.onnx")
    with pytest.raises(ConfigError, match="reference"):
        FrechetScorer.make({"feature_model": str(model)}).score(random_images(0, 3))


def test_preprocessing_options():
    images = random_images(6, 2)
    x = ImagePreprocessing(scale=1.0, mean=(1, 2, 3), std=(2, 2, 2), channel_order="BGR", layout="NHWC")(images)
    expected = (images[..., ::-1].astype(np.float32) - np.array([1, 2, 3], np.float32)) / 2
    np.testing.assert_allclose(x, expected)
    assert ImagePreprocessing(size=8)(images).shape == (2, 3, 8, 8)
    with pytest.raises(ConfigError):
        ImagePreprocessing(layout="CHW")
    assert SCORERS == (FrechetScorer,)
