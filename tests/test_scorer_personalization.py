"""The personalization scorers (``clip-i``, ``clip-t``, ``dino``) and the ``aesthetic`` scorer equal
direct transformers / torch computations on tiny random models built from configs; missing folders
and files, pickled heads and heads of the wrong shape are one-line errors naming the option."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from resalign.errors import ConfigError, DataError, MissingWeightsError, ModelLoadError

pytestmark = pytest.mark.usefixtures("no_network")

PROMPTS = ["a red cat", "a blue dog on a green hill", "x"]


def images(seed: int, n: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """Three reference images of different sizes, one in a subfolder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("reference")
    (root / "sub").mkdir()
    for i, (name, (h, w)) in enumerate({"a.png": (40, 48), "b.jpg": (64, 32), "sub/c.png": (50, 50)}.items()):
        Image.fromarray(images(10 + i, 1, h, w)[0]).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def reference_arrays(root):
    from PIL import Image

    return [np.asarray(Image.open(root / n).convert("RGB")) for n in ("a.png", "b.jpg", "sub/c.png")]


@pytest.fixture(scope="module", params=["vit", "dinov2"])
def dino_dir(request, tmp_path_factory):
    """A tiny random ViT or Dinov2 folder with its image processor (save_pretrained)."""
    from fixtures.tiny_dino import build_tiny_dino

    return build_tiny_dino(tmp_path_factory.mktemp("dino") / request.param, request.param)


def cosine_matrix_mean(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """By hand: a_i · b_j / (|a_i| |b_j|), averaged over j."""
    a, b = a.double(), b.double()
    dots = a @ b.T
    norms = a.norm(dim=1, keepdim=True) * b.norm(dim=1)[None, :]
    return (dots / norms).mean(dim=1).numpy()


# --------------------------------------------------------------------------- CLIP-I, CLIP-T


def clip_image_embeds(folder, arrays) -> torch.Tensor:
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model.get_image_features(**processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt"))
    # transformers 5 returns the vision output with the projected embedding as its pooler_output
    return out if torch.is_tensor(out) else out.pooler_output


def test_clip_i_equals_transformers(clip_dir, reference_dir):
    from resalign.eval.scoring.run import create_scorer

    ims = images(0, 4)
    expected = cosine_matrix_mean(clip_image_embeds(clip_dir, list(ims)),
                                  clip_image_embeds(clip_dir, reference_arrays(reference_dir)))
    scorer = create_scorer("clip-i", {"model": str(clip_dir), "reference": str(reference_dir), "batch_size": 3,
                                      "device": "cpu"})
    result = scorer.score(ims)
    np.testing.assert_allclose([r["clip_i"] for r in result.per_image], expected, rtol=1e-5, atol=1e-5)
    assert result.metric == "clip_i" and result.value == pytest.approx(expected.mean(), abs=1e-5)
    assert result.details["reference_count"] == 3 and "weights_sha256" in result.details


def test_clip_t_is_clip_score_as_raw_cosine(clip_dir):
    from resalign.eval.scoring.run import create_scorer
    from resalign.scorers.clip import ClipScoreScorer
    from resalign.scorers.personalization import ClipTScorer

    from test_scorer_clip import transformers_clip_score

    assert issubclass(ClipTScorer, ClipScoreScorer)
    ims = images(1, len(PROMPTS))
    expected = transformers_clip_score(clip_dir, ims, PROMPTS) / 100.0
    result = create_scorer("clip-t", {"model": str(clip_dir), "device": "cpu"}).score(ims, PROMPTS)
    np.testing.assert_allclose([r["clip_t"] for r in result.per_image], expected, rtol=1e-5, atol=1e-5)
    assert result.metric == "clip_t" and result.details["scale"] == 1.0
    same = create_scorer("clip-score", {"model": str(clip_dir), "device": "cpu"}).score(ims, PROMPTS)
    assert same.value == pytest.approx(100.0 * result.value, rel=1e-9)


# --------------------------------------------------------------------------- DINO


def dino_cls(folder, arrays) -> torch.Tensor:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model(**processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt"))
    return out.last_hidden_state[:, 0]


def test_dino_equals_transformers(dino_dir, reference_dir):
    from resalign.eval.scoring.run import create_scorer

    ims = images(2, 3)
    expected = cosine_matrix_mean(dino_cls(dino_dir, list(ims)), dino_cls(dino_dir, reference_arrays(reference_dir)))
    result = create_scorer("dino", {"model": str(dino_dir), "reference": str(reference_dir), "batch_size": 2,
                                    "device": "cpu"}).score(ims)
    np.testing.assert_allclose([r["dino"] for r in result.per_image], expected, rtol=1e-5, atol=1e-5)
    assert result.metric == "dino" and result.value == pytest.approx(expected.mean(), abs=1e-5)
    assert result.details["architecture"].startswith(dino_dir.name)


def test_reference_and_model_errors_name_the_option(clip_dir, dino_dir, reference_dir, tmp_path):
    from resalign.eval.scoring.run import create_scorer

    cases = [
        ("clip-i", {"reference": str(reference_dir)}, MissingWeightsError, "clip-i.model is not set"),
        ("clip-i", {"model": str(clip_dir)}, ConfigError, "clip-i.reference is not set"),
        ("clip-i", {"model": str(clip_dir), "reference": str(tmp_path / "nope")}, DataError,
         "clip-i.reference: .*nope not found"),
        ("dino", {"model": str(tmp_path / "none"), "reference": str(reference_dir)}, MissingWeightsError,
         "dino.model: .*none not found"),
        ("dino", {"model": str(dino_dir), "reference": str(tmp_path)}, DataError, "dino.reference: .* holds no images"),
    ]
    for name, options, error, pattern in cases:
        with pytest.raises(error, match=pattern) as err:
            create_scorer(name, options)
        assert "\n" not in str(err.value)
    broken = tmp_path / "broken-reference"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^clip-i\.reference: cannot read image .*a\.png") as err:
        create_scorer("clip-i", {"model": str(clip_dir), "reference": str(broken)}).score(images(3, 1))
    assert "\n" not in str(err.value)
    partial = tmp_path / "partial"
    shutil.copytree(dino_dir, partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(MissingWeightsError, match=r"dino\.model: .* has no image processor"):
        create_scorer("dino", {"model": str(partial), "reference": str(reference_dir)})
    # a CLIP folder is not a DINO ViT
    with pytest.raises(ModelLoadError, match=r"^dino\.model: .* holds a clip model, not a DINO ViT") as err:
        create_scorer("dino", {"model": str(clip_dir), "reference": str(reference_dir)}).score(images(3, 1))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- aesthetic


def laion_mlp(dim: int):
    """LAION's improved-aesthetic-predictor MLP, as its authors define it (no activations)."""
    from torch import nn

    return nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


@pytest.mark.parametrize("form", ["mlp", "linear"])
def test_aesthetic_equals_direct_torch(clip_dir, tmp_path, form):
    from safetensors.torch import save_file

    from resalign.eval.scoring.run import create_scorer
    from fixtures.tiny_clip import EMBED_DIM

    torch.manual_seed(3)
    if form == "mlp":
        head = torch.nn.Module()
        head.layers = laion_mlp(EMBED_DIM)
        path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
        torch.save(head.state_dict(), path)
        assert sorted(head.state_dict())[0] == "layers.0.bias"
    else:
        head = torch.nn.Linear(EMBED_DIM, 1)
        path = tmp_path / "sa_0_4_vit_l_14_linear.safetensors"
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    ims = images(4, 3)
    emb = clip_image_embeds(clip_dir, list(ims))
    with torch.no_grad():
        expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True)) if form == "linear" else \
            head.layers.eval()(emb / emb.norm(dim=-1, keepdim=True))
    expected = expected.squeeze(1).double().numpy()
    result = create_scorer("aesthetic", {"model": str(clip_dir), "head": str(path), "device": "cpu"}).score(ims)
    np.testing.assert_allclose([r["aesthetic"] for r in result.per_image], expected, rtol=1e-5, atol=1e-5)
    assert result.metric == "aesthetic_score" and result.value == pytest.approx(expected.mean(), abs=1e-5)
    assert result.details["head"]["layers"].endswith("→1")


def test_aesthetic_errors_name_the_option(clip_dir, tmp_path):
    from resalign.eval.scoring.run import create_scorer
    from fixtures.tiny_clip import EMBED_DIM

    def build(head):
        return create_scorer("aesthetic", {"model": str(clip_dir), "head": str(head), "device": "cpu"})

    with pytest.raises(MissingWeightsError, match=r"^aesthetic\.head is not set"):
        create_scorer("aesthetic", {"model": str(clip_dir)})
    with pytest.raises(MissingWeightsError, match=r"^aesthetic\.head: .*missing\.pth not found"):
        build(tmp_path / "missing.pth")
    with pytest.raises(MissingWeightsError, match=r"^aesthetic\.model"):
        create_scorer("aesthetic", {"model": str(tmp_path / "noclip"), "head": str(tmp_path)})
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(EMBED_DIM, 1), pickled)  # a pickled module, not a state dict
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(1, EMBED_DIM + 1), "bias": torch.zeros(1)}, wrong)
    two = tmp_path / "two.pth"
    torch.save({"layers.0.weight": torch.zeros(4, EMBED_DIM), "layers.0.bias": torch.zeros(4)}, two)
    for path, pattern in [(pickled, "cannot be read with torch.load\\(weights_only=True\\)"),
                          (wrong, "layer 0 has weight \\(1, 13\\)"),
                          (two, "ends in 4 outputs, not one score")]:
        with pytest.raises(ModelLoadError, match=r"^aesthetic\.head: .*" + pattern) as err:
            build(path).score(images(5, 2))
        assert "\n" not in str(err.value)


def test_registered_as_built_in_scorers():
    from resalign.registry import get_registry

    reg = get_registry()
    assert {"clip-i", "clip-t", "dino", "aesthetic"} <= set(reg.names("scorer"))
    assert reg.info("scorer", "dino").module == "resalign.scorers.personalization"
    assert reg.info("scorer", "aesthetic").module == "resalign.scorers.aesthetic"
