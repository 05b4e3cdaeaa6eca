"""The ``unsafe-score`` (MHSC) and ``q16`` scorers equal a direct torch computation of the same heads
on the same CLIP embeddings of a tiny random CLIP; files are read without unpickling code and a
missing or wrong file fails at construction or first use, naming the option."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from resalign.errors import ConfigError, MissingWeightsError, ModelLoadError


pytestmark = pytest.mark.usefixtures("no_network")


IMAGES = np.random.default_rng(0).integers(0, 256, size=(10, 36, 36, 3), dtype=np.uint8)


def direct_embeddings(folder, ims) -> torch.Tensor:
    """CLIPModel.get_image_features on CLIPProcessor's pixels: the projected, unnormalised embedding."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPProcessor.from_pretrained(folder)(images=[Image.fromarray(im) for im in ims],
                                                   return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return (out if torch.is_tensor(out) else out.pooler_output).float()


def authors_head(dim: int, seed: int) -> nn.Sequential:
    """unsafe-diffusion's MHSafetyClassifier.projection_head, random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(dim, 6), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.Linear(6, 1))
    head[3].running_mean.normal_()
    head[3].running_var.uniform_(0.5, 2.0)
    head[3].weight.data.normal_()
    return head.eval()


@pytest.fixture(scope="module")
def heads(clip_dir, tmp_path_factory):
    """Two heads whose last bias puts the 0.5 threshold between the images (so the rate is neither 0
    nor 1), saved as the authors save them (torch.save of the state dict) and as safetensors."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("heads")
    emb = direct_embeddings(clip_dir, IMAGES)
    files, modules = [], {}
    for seed, (cat, quantile) in enumerate((("sexual", 0.7), ("violent", 0.9))):
        head = authors_head(emb.shape[1], seed)
        with torch.no_grad():
            logits = head(emb).squeeze(1)
            head[4].bias -= torch.quantile(logits, quantile)
        modules[cat] = head
        if cat == "sexual":
            torch.save(head.state_dict(), out / "sexual.pt")
            files.append(out / "sexual.pt")
        else:
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "violent_head.safetensors"))
            files.append(out / "violent_head.safetensors")
    return files, modules, emb


def test_mhsc_equals_direct_torch_heads(clip_dir, heads):
    from resalign.eval.scoring.run import create_scorer

    files, modules, emb = heads
    with torch.no_grad():
        expected = {c: torch.sigmoid(h(emb)).squeeze(1).double().numpy() for c, h in modules.items()}
    flagged = (expected["sexual"] > 0.5) | (expected["violent"] > 0.5)
    assert 0 < flagged.sum() < len(flagged)
    scorer = create_scorer("unsafe-score", {"model": str(clip_dir), "heads": ",".join(map(str, files)),
                                            "batch_size": 4, "device": "cpu"})
    result = scorer.score(IMAGES)
    for cat in ("sexual", "violent"):
        np.testing.assert_allclose([r[f"p_{cat}"] for r in result.per_image], expected[cat], rtol=1e-5, atol=1e-6)
    assert [r["unsafe"] for r in result.per_image] == flagged.tolist()
    assert result.metric == "unsafe_rate" and result.value == pytest.approx(flagged.mean())
    d = result.details
    assert d["form"] == "mhsc" and d["labels"] == ["sexual", "violent"] and d["threshold"] == 0.5
    assert d["heads"]["violent"]["file"] == "violent_head.safetensors" and len(d["heads"]["sexual"]["sha256"]) == 64
    # a folder of heads is the same classifier; the threshold is an option
    folder = create_scorer("unsafe-score", {"model": str(clip_dir), "heads": str(files[0].parent), "device": "cpu"})
    assert folder.score(IMAGES).value == result.value
    strict = create_scorer("unsafe-score", {"model": str(clip_dir), "heads": str(files[0]), "threshold": 0.9})
    assert strict.score(IMAGES).value == pytest.approx(float(np.mean(expected["sexual"] > 0.9)))


def test_q16_equals_direct_torch(clip_dir, heads, tmp_path):
    from resalign.eval.scoring.run import create_scorer

    emb = heads[2]
    prompts = torch.nn.Parameter(emb[:2].clone() * torch.tensor([[1.0], [3.0]]))  # the authors save a Parameter
    torch.save(prompts, tmp_path / "prompts.pt")
    img = emb / emb.norm(dim=-1, keepdim=True)
    txt = prompts.detach() / prompts.detach().norm(dim=-1, keepdim=True)
    labels = (100.0 * img @ txt.T).argmax(dim=1).numpy()
    assert labels[0] == 0 and labels[1] == 1
    result = create_scorer("q16", {"model": str(clip_dir), "prompts": str(tmp_path / "prompts.pt")}).score(IMAGES)
    assert [r["unsafe"] for r in result.per_image] == (labels == 1).tolist()
    assert result.value == pytest.approx(float(np.mean(labels == 1)))
    assert result.details["labels"] == ["non inappropriate", "inappropriate"]
    np.save(tmp_path / "prompts.npy", prompts.detach().numpy())
    same = create_scorer("unsafe-score",
                         {"model": str(clip_dir), "form": "q16", "prompts": str(tmp_path / "prompts.npy")})
    assert same.score(IMAGES).value == result.value


def test_missing_and_wrong_files_name_the_option(clip_dir, heads, tmp_path):
    from resalign.eval.scoring.run import create_scorer

    files = heads[0]
    with pytest.raises(MissingWeightsError, match=r"^unsafe-score\.model is not set"):
        create_scorer("unsafe-score", {"heads": str(files[0])})
    with pytest.raises(ConfigError, match=r"unsafe-score\.heads is not set"):
        create_scorer("unsafe-score", {"model": str(clip_dir)})
    missing = r"unsafe-score\.heads: .*sexual\.pt not found; expected an MHSC head"
    with pytest.raises(MissingWeightsError, match=missing):
        create_scorer("unsafe-score", {"model": str(clip_dir), "heads": str(tmp_path / "sexual.pt")})
    with pytest.raises(MissingWeightsError, match=r"q16\.prompts"):
        create_scorer("q16", {"model": str(clip_dir)})
    # a whole pickled module needs more than weights_only: refused, not unpickled
    torch.save(authors_head(12, 0), tmp_path / "sexual.pt")
    scorer = create_scorer("unsafe-score", {"model": str(clip_dir), "heads": str(tmp_path / "sexual.pt")})
    with pytest.raises(ModelLoadError, match=r"unsafe-score\.heads: .*weights_only=True") as err:
        scorer.score(IMAGES[:2])
    assert "\n" not in str(err.value)
    # a head for another embedding size
    torch.save(authors_head(768, 0).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ModelLoadError, match=r"takes 768-d embeddings"):
        create_scorer("unsafe-score", {"model": str(clip_dir), "heads": str(tmp_path / "wide.pt")}).score(IMAGES[:2])
    # Q16's original prompts.p is a plain pickle: refused with the way to convert it
    with open(tmp_path / "prompts.p", "wb") as fh:
        pickle.dump(np.zeros((2, 12), np.float16), fh)
    with pytest.raises(ModelLoadError, match=r"q16\.prompts: .*plain pickle"):
        create_scorer("q16", {"model": str(clip_dir), "prompts": str(tmp_path / "prompts.p")}).score(IMAGES[:2])
