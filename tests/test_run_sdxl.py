"""An SDXL-shaped folder (two text encoders, ``text_time`` UNet) through ``run``, ``eval``, ``attack`` and
``compare``; the unlearned model loads with diffusers' ``StableDiffusionXLPipeline`` and generates."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch

from resalign.cli import main

SMALL = ["--threads", "1", "--no-progress", "-J", "1", "--K", "2", "--set", "solver_options.power_iters=2",
         "--set", "data.images_per_prompt=1", "--set", "data.gen_steps=2", "--set", "pool.steps=[3]",
         "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from resalign.data.folders import write_folder

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_folder(root / "benign", rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8),
                 ["a photo of a dog"] * 2 + ["a red painting"] * 2)
    (root / "prompts.txt").write_text("a nude person\na photo of a cat\n")
    return root


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-run") / "run"
    assert main(["run", "--model", str(tiny_sdxl_dir), "--out", str(out), "--loss", "esd", "--adapt", "lora",
                 "--outer-steps", "3", *SMALL]) == 0
    return out


def test_sdxl_folder_is_unlearned_and_loads_with_the_sdxl_pipeline(tiny_sdxl_dir, sdxl_run):
    from diffusers import StableDiffusionXLPipeline

    cfg = tomllib.loads((sdxl_run / "config.toml").read_text())
    assert cfg["preset"] == "sdxl" and cfg["loss"] == "esd" and cfg["adapt"] == ["lora"]
    rows = [json.loads(x) for x in (sdxl_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss_harm"]) for r in rows)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_run / "model")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a dog", num_inference_steps=2, output_type="np", height=16, width=16).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ours, theirs = pipe.unet.state_dict(), base.unet.state_dict()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])]
    for name in ("text_encoder", "text_encoder_2", "vae"):  # frozen
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_eval_and_attack_on_the_unlearned_sdxl_model(sdxl_run, folders, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", str(sdxl_run), "--prompts", str(folders / "prompts.txt"), "--steps", "2", "--seeds", "1",
                 "--out", str(out), "--quiet"]) == 0
    (row,) = json.loads((out / "report.json").read_text())["results"]
    assert row["model"] == "run" and row["n"] == 1 and row["metric"] == "harmful_rate"
    out = tmp_path / "attack"
    assert main(["attack", str(sdxl_run), "--adapt", "lora", "--data", str(folders / "benign"), "--prompts",
                 str(folders / "prompts.txt"), "--steps", "2", "--eval-every", "1", "--seeds", "1",
                 "--sample-steps", "2", "--lr", "1e-3", "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    assert [(r["stage"], r["step"]) for r in rows] == [("before_ft", 0), ("after_ft", 1), ("after_ft", 2)]
    assert json.loads((out / "report.json").read_text())["settings"]["preset"] == "sdxl"


@pytest.mark.slow
def test_compare_base_esd_resalign_on_an_sdxl_folder(tiny_sdxl_dir, folders, tmp_path):
    opts = ["outer_steps=2", "J=1", "solver_options.K=2", "data.images_per_prompt=1", "data.sample_steps=2",
            "pool.steps=[2]", "harm_batch=2", "preserve_batch=2", "ft_size=1"]
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_sdxl_dir), "--methods", "base,esd,resalign",
                 *[a for o in opts for a in ("--unlearn-option", o)], "--dataset", str(folders / "benign"),
                 "--prompts", str(folders / "prompts.txt"), "--benign-prompts", str(folders / "prompts.txt"),
                 "--ft-steps", "2", "--seeds", "1", "--sample-steps", "2", "--images-per-prompt", "1",
                 "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    assert {r["model"] for r in rows} == {"base", "esd", "resalign"}
    assert {r["model"] for r in rows if r["stage"] == "after_ft"} == {"esd", "resalign"}
