"""The ``clip-score`` scorer equals a direct transformers computation on a tiny random CLIP folder,
and a missing or incomplete folder fails at construction, naming ``clip-score.model``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from resalign.errors import MissingWeightsError, ModelLoadError

pytestmark = pytest.mark.usefixtures("no_network")

PROMPTS = ["a red cat", "a blue dog on a green hill, very detailed, oil painting", "x", "two birds"]


def images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 40, 48, 3), dtype=np.uint8)


def transformers_clip_score(folder, ims, prompts) -> np.ndarray:
    """100 x cos of each image and its prompt, from CLIPModel's own forward pass and CLIPProcessor."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=[Image.fromarray(im) for im in ims], return_tensors="pt",
                       padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    return 100.0 * (out.image_embeds * out.text_embeds).sum(-1).double().numpy()


def test_clip_score_equals_transformers(clip_dir):
    from resalign.eval.scoring.run import create_scorer

    ims = images(0, len(PROMPTS))
    expected = transformers_clip_score(clip_dir, ims, PROMPTS)
    scorer = create_scorer("clip-score", {"model": str(clip_dir), "batch_size": 3, "device": "cpu"})
    result = scorer.score(ims, PROMPTS)
    got = np.array([r["clip_score"] for r in result.per_image])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert result.metric == "clip_score"
    assert result.value == pytest.approx(expected.mean(), rel=1e-5, abs=1e-5)
    assert result.details["scale"] == 100.0 and result.details["clamp"] is False
    assert set(result.details["weights_sha256"]) == {"model.safetensors"}
    # the figure depends on which prompt goes with which image
    shuffled = scorer.score(ims, PROMPTS[1:] + PROMPTS[:1])
    assert not np.allclose([r["clip_score"] for r in shuffled.per_image], got, atol=1e-3)


def test_clip_score_scale_and_clamp(clip_dir):
    from resalign.scorers.clip import ClipScoreScorer

    ims = images(1, 4)
    base = ClipScoreScorer.make({"model": str(clip_dir), "device": "cpu"})
    cos = base.cosines(ims, PROMPTS)
    clamped = ClipScoreScorer.make({"model": str(clip_dir), "scale": 2.5, "clamp": True, "device": "cpu"})
    assert clamped.score(ims, PROMPTS).value == pytest.approx(float(np.mean(2.5 * np.maximum(cos, 0))), rel=1e-9)


def test_missing_or_incomplete_folder_names_the_option(clip_dir, tmp_path):
    from resalign.eval.scoring.run import create_scorer

    with pytest.raises(MissingWeightsError) as err:
        create_scorer("clip-score", {})
    assert "clip-score.model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MissingWeightsError, match=r"clip-score\.model: .*nope not found"):
        create_scorer("clip-score", {"model": str(tmp_path / "nope")})
    partial = tmp_path / "partial"
    shutil.copytree(clip_dir, partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(MissingWeightsError) as err:
        create_scorer("clip-score", {"model": str(partial)})
    assert "clip-score.model" in str(err.value) and "preprocessor_config.json" in str(err.value)
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"^clip-score\.model: cannot load .*broken as CLIP") as err:
        create_scorer("clip-score", {"model": str(broken)}).score(images(2, 2), PROMPTS[:2])
    assert "\n" not in str(err.value)
