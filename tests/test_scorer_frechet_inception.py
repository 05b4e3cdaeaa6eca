"""``frechet`` with pytorch-fid's Inception-v3 from a local ``.pth`` equals pytorch-fid's own
``calculate_fid_given_paths`` (random weights, dims=64, more images than dimensions), for a reference
folder and for pytorch-fid's ``.npz``; its full network equals pytorch-fid's ``InceptionV3``; a
missing or wrong file fails before any work, naming ``frechet.weights``."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from resalign.errors import ConfigError, MissingWeightsError, ModelLoadError

N_IMAGES = 66  # > dims = 64, so both covariances are full rank

pytestmark = [pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("no_network")]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An Inception-v3 of pytorch-fid's shapes (1008 classes, no aux head), random weights, as .pth."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=True)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def pytorch_fid_offline(monkeypatch, weights):
    """pytorch-fid's modules, its weight download replaced by reading the test's file."""
    from pytorch_fid import fid_score
    from pytorch_fid import inception as pf

    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: torch.load(weights, weights_only=True))
    return fid_score, pf


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two image folders that differ in distribution: uniform noise, and noisy colour gradients."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    for name in ("generated", "real"):
        (root / name).mkdir()
        for i in range(N_IMAGES):
            if name == "generated":
                im = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            else:
                ramp = np.linspace(0, 255, 24)[None, :, None] * rng.random(3)[None, None, :]
                im = np.clip(ramp + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / name / f"{i:03d}.png")
    return root / "generated", root / "real"


def pf_to_tensor(image: np.ndarray) -> torch.Tensor:
    """pytorch-fid's image transform (torchvision ToTensor) of one uint8 image."""
    import torchvision.transforms as TF

    return TF.ToTensor()(Image.fromarray(image))


def read_folder(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def test_frechet_equals_pytorch_fid(pytorch_fid_offline, weights, folders, tmp_path):
    from resalign.eval.scoring.run import create_scorer

    fid_score, _ = pytorch_fid_offline
    generated, real = folders
    npz = tmp_path / "real.npz"
    fid_score.save_fid_stats([str(real), str(npz)], 50, "cpu", 64, num_workers=0)
    expected = fid_score.calculate_fid_given_paths([str(generated), str(npz)], 50, "cpu", 64, num_workers=0)
    assert expected > 0.1  # the two sets are told apart at dims=64

    options = {"weights": str(weights), "dims": 64, "device": "cpu", "cache_dir": str(tmp_path / "cache")}
    scorer = create_scorer("frechet", {**options, "reference": str(real)})
    result = scorer.score(read_folder(generated))
    assert result.value == pytest.approx(expected, rel=1e-6)
    assert result.details["feature_dim"] == 64 and result.details["dims"] == 64
    assert result.details["reference_count"] == N_IMAGES and result.details["n_images"] == N_IMAGES
    assert result.details["weights"] == weights.name and len(result.details["weights_sha256"]) == 64

    # pytorch-fid's .npz is read as the reference, and holds the statistics computed from the folder
    ours = scorer.reference_stats()
    theirs = create_scorer("frechet", {**options, "reference": str(npz)}).reference_stats()
    np.testing.assert_allclose(ours.mu, theirs.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.sigma, theirs.sigma, rtol=1e-6, atol=1e-9)


def test_full_network_equals_pytorch_fid_inception(pytorch_fid_offline, weights, folders):
    """The 768- and 2048-d blocks, through every FID-patched Inception module, match pytorch-fid's."""
    from resalign.scorers.fid_inception import FidInceptionExtractor

    _, pf = pytorch_fid_offline
    images = read_folder(folders[1])[:2]
    reference = pf.InceptionV3([2, 3]).eval()
    x = torch.stack([pf_to_tensor(im) for im in images])
    with torch.no_grad():
        blocks = reference(x)
    for dims, block in zip((768, 2048), blocks):
        expected = torch.nn.functional.adaptive_avg_pool2d(block, 1).flatten(1).double().numpy()
        got = FidInceptionExtractor(weights, dims, device="cpu")(images)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_missing_or_wrong_weights_name_the_option(tmp_path, monkeypatch):
    from resalign.eval.scoring.run import create_scorer

    blank = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(MissingWeightsError) as err:
        create_scorer("frechet", {"weights": str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")})
    msg = str(err.value)
    assert msg.startswith("frechet.weights: ") and "pt_inception-2015-12-05-6726825d.pth" in msg and "\n" not in msg
    with pytest.raises(MissingWeightsError, match=r"^frechet\.weights is not set: .*pt_inception-2015-12-05"):
        create_scorer("frechet", {"reference": str(tmp_path)}).score(blank)
    with pytest.raises(ConfigError, match="dims"):
        create_scorer("frechet", {"dims": 100})
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    scorer = create_scorer("frechet", {"weights": str(wrong), "reference": str(tmp_path), "device": "cpu"})
    with pytest.raises(ModelLoadError, match=r"^frechet\.weights: .*does not fit the FID Inception") as err:
        scorer.score(blank)
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    with pytest.raises(ModelLoadError, match=r"resalign\[fid\]"):
        create_scorer("frechet", {"weights": str(wrong), "reference": str(tmp_path)}).score(blank)


def test_eval_fails_before_generation(tiny_sd_dir, tmp_path, capsys):
    from resalign.cli import main

    prompts = tmp_path / "coco.csv"
    prompts.write_text("prompt\na red bus\na cat on a sofa\n")
    out = tmp_path / "run"
    rc = main(["eval", str(tiny_sd_dir), "--prompts", str(prompts), "--scorer", "frechet", "--scorer-option",
               f"frechet.weights={tmp_path / 'pt_inception-2015-12-05-6726825d.pth'}", "--out", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "frechet.weights" in err and "pt_inception-2015-12-05-6726825d.pth" in err
    assert not out.exists()
