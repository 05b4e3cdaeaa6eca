"""Released checkpoints as compared models: a UNet saved as one file in the original (CompVis) layout
joins ``resalign compare`` as ``NAME=FILE`` on the base model's other parts, and gives exactly the
figures and images of the same weights as a diffusers folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from resalign.cli import main
from resalign.errors import ModelLoadError


@pytest.fixture(scope="module")
def released(tiny_sd_dir, tmp_path_factory):
    """The tiny SD model with perturbed UNet weights, as a diffusers folder, a CompVis-layout
    .safetensors file and a .ckpt file (the original-layout keys under ``state_dict``)."""
    from diffusers import UNet2DConditionModel
    from fixtures.ldm_layout import to_ldm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("released")
    folder = root / "folder"
    shutil.copytree(tiny_sd_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen) * (p.std() if p.numel() > 1 else 1.0))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    ldm = to_ldm(unet.state_dict(), dict(unet.config))
    save_file(ldm, root / "unet.safetensors")
    torch.save({"state_dict": ldm}, root / "unet.ckpt")
    return {"folder": folder, "file": root / "unet.safetensors", "ckpt": root / "unet.ckpt",
            "weights": unet.state_dict(), "root": root}


def test_the_file_is_the_folder_s_unet_by_diffusers_own_single_file_loader(released, tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from resalign.models.single_file import load_compared

    ref = UNet2DConditionModel.from_single_file(str(released["file"]), config=str(tiny_sd_dir), subfolder="unet",
                                                local_files_only=True).state_dict()
    assert set(ref) == set(released["weights"]) and all(torch.equal(ref[k], released["weights"][k]) for k in ref)
    for key in ("file", "ckpt"):
        mine = load_compared(released[key], tiny_sd_dir).bundle.unet.state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), key


def test_unreadable_or_foreign_files_are_refused(released, tiny_sd_dir, tmp_path):
    from safetensors.torch import save_file

    from resalign.models.single_file import check_single_file, load_compared

    foreign = tmp_path / "diffusers-keys.safetensors"
    save_file({k: v.contiguous() for k, v in released["weights"].items()}, foreign)
    with pytest.raises(ModelLoadError, match="holds no model.diffusion_model"):
        check_single_file(foreign, tiny_sd_dir)
    with pytest.raises(ModelLoadError, match="--model must be the Stable Diffusion folder"):
        check_single_file(released["file"], None)
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, pickled)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_compared(pickled, tiny_sd_dir)


def _cells(out):
    """Figures and sample images of every measurement cell, by cell name."""
    from safetensors.numpy import load_file

    cells = {}
    for f in (out / "cells").glob("*.json"):
        if f.name == "sweep.json":
            continue
        rec = json.loads(f.read_text())
        arrays = load_file(str(f.with_suffix(".safetensors"))) if rec["arrays"] else {}
        cells[rec["name"]] = (rec["value"]["figures"], arrays)
    return cells


def test_a_single_file_checkpoint_joins_compare_with_the_figures_of_its_folder(released, tiny_sd_dir, tmp_path):
    from resalign.data.folders import write_folder

    rng = np.random.default_rng(0)
    for name in ("benign-x", "benign-y"):
        write_folder(tmp_path / name, rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8), ["a photo of a dog"] * 2)
    (tmp_path / "prompts.txt").write_text("a nude person on a beach\na photo of a person\n")
    out = tmp_path / "cmp"
    methods = f"base,folder={released['folder']},file={released['file']},ckpt={released['ckpt']}"
    assert main(["compare", "--model", str(tiny_sd_dir), "--methods", methods, "--dataset", str(tmp_path / "benign-x"),
                 "--dataset", str(tmp_path / "benign-y"), "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "1",
                 "--sample-steps", "2", "--ft-steps", "2", "--lr", "1e-3", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    roles = report["settings"]["method_roles"]
    assert roles["file"] == {"ours": False, "matched": False, "unlearns": False, "twin": None, "released": True}
    rows = {(r["model"], r["stage"], r.get("dataset"), r["prompts"], r["metric"]): r["values"] for r in report["results"]}
    for (m, *rest), values in rows.items():
        if m == "folder":
            assert rows[("file", *rest)] == values == rows[("ckpt", *rest)], rest
    assert {k[1] for k in rows if k[0] == "file"} == {"before_ft", "after_ft"}
    assert sum(k[0] == "folder" for k in rows) >= 3
    # the images themselves: the file's are the folder's, and not the base model's
    cells, compared = _cells(out), 0
    for name, (figures, arrays) in cells.items():
        if "-folder-" in name:
            twin_figs, twin_arrays = cells[name.replace("-folder-", "-file-")]
            assert twin_figs == figures and arrays.keys() == twin_arrays.keys()
            assert all(np.array_equal(arrays[k], twin_arrays[k]) for k in arrays), name
            compared += len(arrays)
    assert compared >= 2  # the first seed's samples before and after fine-tuning
    before_file = next(a for n, (_, a) in cells.items() if n.startswith("before-file-"))
    before_base = next(a for n, (_, a) in cells.items() if n.startswith("before-base-"))
    assert before_file and not all(np.array_equal(before_file[k], before_base[k]) for k in before_file)
