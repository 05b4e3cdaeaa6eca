"""The toy classifiers: training on procedural images, ONNX export agreeing with torch, the scorers."""

from __future__ import annotations

import numpy as np
import pytest

from resalign.data import toy as world
from resalign.models.toy_classifiers import (
    ClassifierTraining,
    OnnxToyClassifier,
    augment,
    export_onnx,
    labelled_images,
    predict_torch,
    train_classifier,
)

SMALL = ClassifierTraining(steps=60, batch_size=64, pool=600, lr=3e-3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("classifiers")
    harm = train_classifier("harm", SMALL)
    sc = train_classifier("shape_colour", SMALL)
    return {
        "harm": (harm, export_onnx(harm, "harm", d / "harm_classifier.onnx")),
        "shape_colour": (sc, export_onnx(sc, "shape_colour", d / "shape_colour_classifier.onnx")),
    }


@pytest.mark.parametrize("kind", ["harm", "shape_colour"])
def test_onnx_matches_torch(exported, kind):
    model, path = exported[kind]
    images, _ = labelled_images(100, seed=77, harm_share=0.5)
    images = augment(images, np.random.default_rng(0))
    a = predict_torch(model, images, kind)
    b = OnnxToyClassifier(path)(images, batch_size=33)  # uneven batches: dynamic batch axis
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, rtol=0)


def test_onnx_outputs_and_metadata(exported):
    clf = OnnxToyClassifier(exported["shape_colour"][1])
    out = clf(world.make_dataset(5, seed=0).images)
    assert out["logits"].shape == (5, len(world.SHAPES) + len(world.COLOURS))
    assert out["features"].shape == (5, 64)
    assert clf.meta["shapes"] == list(world.SHAPES) and clf.meta["harmful_shape"] == world.HARMFUL_SHAPE
    assert OnnxToyClassifier(exported["harm"][1]).outputs == ["harm_probability"]


def test_short_training_already_separates_the_harmful_shape(exported):
    images, scenes = labelled_images(400, seed=123, harm_share=0.5)
    p = OnnxToyClassifier(exported["harm"][1])(images)["harm_probability"]
    truth = np.array([s.shape == world.HARMFUL_SHAPE for s in scenes])
    assert ((p > 0.5) == truth).mean() > 0.7


def test_scorers_on_procedural_images(exported):
    from resalign.scorers.toy import ToyFrechetScorer, ToyHarmScorer, ToyPromptAccuracyScorer

    harm = ToyHarmScorer.make({"classifier": str(exported["harm"][1])})
    ds = world.make_dataset(50, seed=9, style=world.FULL_CAPTIONS)
    res = harm.score(ds.images)
    assert res.metric == "harmful_rate" and len(res.per_image) == 50
    assert res.value == np.mean([r["harmful"] for r in res.per_image])

    acc = ToyPromptAccuracyScorer.make({"classifier": str(exported["shape_colour"][1])})
    r = acc.score(ds.images, ds.prompts)
    assert r.metric == "prompt_accuracy" and r.details["n_counted"] == 50
    shapes, colours = acc.predict(ds.images)
    want = [world.parse_prompt(p) for p in ds.prompts]
    expected = np.mean([s == w.shape and c == w.colour for s, c, w in zip(shapes, colours, want)])
    assert r.value == pytest.approx(expected)
    # prompts naming neither shape nor colour are not counted
    r2 = acc.score(ds.images[:2], ["a small shape", "a red shape"])
    assert r2.details["n_counted"] == 1

    fd = ToyFrechetScorer.make({"classifier": str(exported["shape_colour"][1]), "reference_size": 300})
    same = fd.score(world.benign_dataset_b(300, seed=4).images).value
    rings = fd.score(world.contamination_pool(300, seed=4).images).value
    assert 0 <= same < rings


def test_scorer_errors_are_clear(exported):
    from resalign.errors import ConfigError, ModelLoadError
    from resalign.scorers.toy import ToyHarmScorer, ToyPromptAccuracyScorer

    acc = ToyPromptAccuracyScorer.make({"classifier": str(exported["shape_colour"][1])})
    imgs = world.make_dataset(3, seed=0).images
    with pytest.raises(ConfigError, match="needs the prompts"):
        acc.score(imgs)
    with pytest.raises(ConfigError, match="3 images but 2 prompts"):
        acc.score(imgs, ["a", "b"])
    with pytest.raises(ConfigError, match="uint8"):
        acc.score(imgs.astype(np.float32), ["a"] * 3)
    with pytest.raises(ModelLoadError, match="nope.onnx"):
        ToyHarmScorer.make({"classifier": "nope.onnx"})
    with pytest.raises(ConfigError, match="unknown option"):
        ToyHarmScorer.make({"treshold": 0.3})


def test_frechet_helper_matches_the_closed_form():
    from resalign.scorers.toy import frechet_distance_numpy

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I): |mu|^2 = 3, tr = 3 + 12 - 2 * 3 * 2 = 3  => 6
    assert frechet_distance_numpy(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance_numpy(a, a) == pytest.approx(0.0, abs=1e-8)


def test_scorers_are_registered():
    from resalign.registry import build_registry

    names = build_registry(entry_points=False).names("scorer")
    assert {"toy-harm", "toy-prompt-accuracy", "toy-frechet"} <= set(names)
