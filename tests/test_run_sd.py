"""A Stable-Diffusion-shaped folder (latents through the VAE) through ``resalign run --model DIR``."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import torch

from resalign.cli import main

SMALL = ["--threads", "1", "--no-progress", "-J", "1", "--K", "2", "--set", "solver_options.power_iters=2",
         "--set", "data.images_per_prompt=1", "--set", "data.gen_steps=2", "--set", "pool.steps=[5]",
         "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=1"]


def test_sd_folder_is_unlearned_and_loads_with_diffusers(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_sd_dir), "--out", str(out), "--outer-steps", "2", *SMALL]) == 0
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["preset"] == "sd" and cfg["data"]["concept"] == "nudity"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss_harm"]) for r in rows)
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    image = pipe("a photo of a dog", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed
    # the text encoder and the VAE stay frozen
    for name in ("text_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the quick evaluation ran on the run's own prompts, or says why it could not (no offline scorer)
    report = json.loads((out / "report.json").read_text())
    quick = report["settings"]["quick_evaluation"]
    if "skipped" in quick:
        assert "Quick evaluation skipped" in (out / "report.md").read_text()
    else:
        assert [s["name"] for s in quick["sets"]] == ["harmful", "preserve"]
        assert {r["model"] for r in report["results"] if r.get("stage") == "quick_eval"} == {"base", "unlearned"}


def test_bf16_compute_on_cpu_keeps_fp32_master_weights(tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_sd_dir), "--out", str(out), "--outer-steps", "1", "--dtype", "bf16",
                 "--params", "lora", "--adapt", "lora", *SMALL]) == 0
    from safetensors.torch import load_file

    for part in ("unet", "text_encoder", "vae"):
        folder = out / "model" / part
        weights = load_file(next(folder.glob("*.safetensors")))
        assert all(v.dtype == torch.float32 for v in weights.values()), part
