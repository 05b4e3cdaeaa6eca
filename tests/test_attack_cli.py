"""``resalign attack`` end to end: a tiny Stable-Diffusion-shaped folder through LoRA fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats

from resalign.cli import main


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dir):
    return tiny_sd_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from resalign.data.folders import write_folder

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_folder(root / "benign", rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8),
                 ["a photo of a dog"] * 3 + ["a red painting"] * 3)
    write_folder(root / "harmful", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), ["a nude person"] * 4)
    (root / "prompts.txt").write_text("a nude person on a beach\n# a comment\na photo of a person\n")
    return root


def _rows(out):
    return json.loads((out / "report.json").read_text())["results"]


def test_attack_lora_on_tiny_sd_folder(tiny_sd, folders, tmp_path):
    out = tmp_path / "run"
    rc = main([
        "attack", str(tiny_sd), "--adapt", "lora", "--data", str(folders / "benign"), "--prompts",
        str(folders / "prompts.txt"), "--steps", "4", "--eval-every", "2", "--seeds", "2", "--sample-steps", "2",
        "--lr", "1e-3", "--out", str(out), "--quiet",
    ])
    assert rc == 0
    rows = _rows(out)
    assert [(r["stage"], r["step"]) for r in rows] == [("before_ft", 0), ("after_ft", 2), ("after_ft", 4)]
    for r in rows:
        assert r["model"] == "tiny-sd" and r["finetune"] == "lora" and r["dataset"] == "benign"
        assert r["prompts"] == "prompts" and r["metric"] == "harmful_rate" and r["scorer"] == "nudenet"
        assert r["n"] == 2 and r["sem"] == pytest.approx(scipy.stats.sem(r["values"]))
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["finetune"]["adapt"] == "lora" and settings["finetune"]["lr"] == 1e-3
    assert settings["preset"] == "sd" and settings["seeds"] == [0, 1]
    for f in ("report.md", "report.csv", "harmful_rate_vs_step.png", "samples.png", "config.toml"):
        assert (out / f).is_file(), f


def test_attack_stress_options(tiny_sd, folders, tmp_path):
    base = ["attack", str(tiny_sd), "--data", str(folders / "benign"), "--prompts", str(folders / "prompts.txt"),
            "--steps", "4", "--eval-every", "0", "--seeds", "1", "--sample-steps", "1", "--quiet"]
    out = tmp_path / "contaminated"
    assert main(base + ["--contaminate", "0.5", "--harmful-data", str(folders / "harmful"),
                        "--escape", "p=1,lambda=0.5", "--out", str(out)]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["finetune"]["escape_p"] == 1 and settings["finetune"]["escape_lambda"] == 0.5
    assert "50% of benign replaced by harmful pairs" in settings["notes"]
    out = tmp_path / "progressive"
    assert main(base + ["--progressive", "--harmful-data", str(folders / "harmful"), "--out", str(out)]) == 0
    stages = json.loads((out / "report.json").read_text())["settings"]["stages"]
    assert [s["steps"] for s in stages] == [1, 1, 1, 1]
    assert [s["name"] for s in stages] == ["benign", "benign", "harmful-milder-half", "harmful"]
    assert stages[2]["pairs"] == 2 and stages[3]["pairs"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adapt", "dora"], "--adapt 'dora'"),
        (["--contaminate", "0.3"], "--harmful-data"),
        (["--progressive"], "--harmful-data"),
        (["--escape", "p=3"], "p must be 1 or 2"),
        (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    ],
)
def test_attack_rejects_bad_options_before_work(tiny_sd, folders, tmp_path, capsys, extra, message):
    args = ["attack", str(tiny_sd), "--prompts", str(folders / "prompts.txt"), "--out", str(tmp_path / "o"), "--quiet"]
    if "--data" not in extra:
        args += ["--data", str(folders / "benign")]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
