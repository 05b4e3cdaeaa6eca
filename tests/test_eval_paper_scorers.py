"""``resalign eval`` on a Stable-Diffusion folder with the paper preset: the scorers of Tab. 1 whose
local files are given (US, FID, CLIP score) join NudeNet's IP in one table, with their definitions
(labels, thresholds, checksums) in the report; a missing file fails before any image is generated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CLIP folder, an MHSC head for it, a tiny ONNX feature network and reference statistics."""
    from fixtures.tiny_clip import EMBED_DIM, build_tiny_clip
    from test_scorer_frechet import numpy_features, random_images, write_onnx

    from resalign.metrics import FeatureStats

    root = tmp_path_factory.mktemp("paper-scorers")
    clip = build_tiny_clip(root / "clip")
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(EMBED_DIM, 6), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.Linear(6, 1))
    torch.save(head.state_dict(), root / "sexual.pt")
    FeatureStats.from_features(numpy_features(random_images(1, 20))).save(root / "coco.npz")
    return {"clip": clip, "head": root / "sexual.pt", "onnx": write_onnx(root / "features.onnx"),
            "reference": root / "coco.npz"}


@pytest.fixture
def coco_csv(tmp_path):
    path = tmp_path / "coco.csv"
    path.write_text("case_number,prompt,evaluation_seed\n0,a red bus,1\n1,a cat on a sofa,2\n")
    return path


def options(files) -> list[str]:
    return [
        "--scorer-option", f"unsafe-score.model={files['clip']}",
        "--scorer-option", f"unsafe-score.heads={files['head']}",
        "--scorer-option", f"frechet.feature_model={files['onnx']}",
        "--scorer-option", "frechet.input_size=4",
        "--scorer-option", f"frechet.reference={files['reference']}",
        "--scorer-option", f"clip-score.model={files['clip']}",
    ]


def test_paper_preset_reports_ip_us_fid_and_clip_score(tiny_sd_dir, coco_csv, files, tmp_path):
    from resalign.cli import main

    out = tmp_path / "run"
    rc = main(["eval", str(tiny_sd_dir), "--preset", "paper", "--prompts", str(coco_csv), "--images-per-prompt", "2",
               "--sample-steps", "1", "--no-save-images", "--out", str(out), "--quiet", *options(files)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["preset"] == "sd"
    got = [(r["metric"], r["scorer"]) for r in report["results"]]
    assert got == [("harmful_rate", "nudenet"), ("unsafe_rate", "unsafe-score"),
                   ("frechet_distance", "frechet"), ("clip_score", "clip-score")]
    assert all(r["n"] == 1 and np.isfinite(r["mean"]) for r in report["results"])
    scorers = report["settings"]["evaluation"]["scorers"]
    assert scorers["unsafe-score"]["details"]["threshold"] == 0.5
    assert len(scorers["unsafe-score"]["details"]["heads"]["sexual"]["sha256"]) == 64
    assert scorers["clip-score"]["details"]["scale"] == 100.0
    assert "detector_sha256" in scorers["nudenet"]["details"]
    header = next(line for line in (out / "report.md").read_text().splitlines() if "clip_score (clip-score)" in line)
    for column in ("harmful_rate (nudenet)", "unsafe_rate (unsafe-score)", "frechet_distance (frechet)"):
        assert column in header


def test_missing_clip_folder_fails_before_generation(tiny_sd_dir, coco_csv, files, tmp_path, capsys, monkeypatch):
    import resalign.eval.scoring.generate as generate
    from resalign.cli import main

    def no_generation(*args, **kwargs):
        raise AssertionError("an image was generated")

    monkeypatch.setattr(generate, "generate", no_generation)
    out = tmp_path / "run"
    missing = tmp_path / "clip-vit-base-patch32"
    rc = main(["eval", str(tiny_sd_dir), "--prompts", str(coco_csv), "--out", str(out), "--quiet",
               *options(files)[:-1], f"clip-score.model={missing}"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "clip-score.model" in err and str(missing) in err
    assert not out.exists()
