"""A run's checkpoints and recorded configuration: the one reader and writer of that format.

A run directory (:class:`resalign.rundir.RunDir`) records the resolved configuration in
``config.toml`` and keeps checkpoints in ``checkpoints/step-NNNNNN/``:

- ``theta.safetensors``: θ of Alg. 2 (the run's parameterization, ``--params full|xattn|lora``);
- ``optimizer.safetensors``: the outer optimizer's tensors (flattened, their shapes in ``state.json``)
  and the torch RNG state (``rng.torch``);
- ``solver.safetensors``: the solver's state, ``GROUP/NAME`` (only when it has one);
- ``state.json``: the step, parameter names, optimizer scalars and param groups, RNG facts;

``checkpoints/latest.json`` names the latest folder. A folder is written under a temporary name and
renamed, so a cut-off save never replaces a complete checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from resalign.config import from_dict, load_toml
from resalign.core.params import Parameterization, ParamsOptions
from resalign.rundir import RunDir, atomic_write_bytes, atomic_write_json


def save_checkpoint(rd: RunDir, trainer: Any, keep: int) -> Path:
    """Write ``trainer.state_dict()`` (a :class:`~resalign.core.meta.ResAlign`'s) as the checkpoint of its
    step and make it the latest; keep the last ``keep`` checkpoints (every one when ``keep`` <= 0)."""
    from safetensors.torch import save as st_save

    state = trainer.state_dict()
    step = state["step"]
    folder = rd.checkpoints / f"step-{step:06d}"
    tmp = rd.checkpoints / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    theta = {k: v.detach().cpu().contiguous() for k, v in state["theta"].items()}
    atomic_write_bytes(tmp / "theta.safetensors", st_save(theta))
    opt = state["optimizer"]
    tensors, scalars = {}, {}
    for idx, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().reshape(-1).contiguous()
                scalars[f"{idx}.{key}"] = list(value.shape)
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write_bytes(tmp / "optimizer.safetensors", st_save(tensors))
    solver = {f"{group}/{k}": v.detach().cpu().contiguous() for group, vs in state["solver"].items() for k, v in vs.items()}
    if solver:
        atomic_write_bytes(tmp / "solver.safetensors", st_save(solver))
    atomic_write_json(tmp / "state.json", {
        "step": step,
        "param_names": list(theta),
        "optimizer": {"param_groups": opt["param_groups"], "entries": scalars},
        "rng": {"python": random.getstate()[1][:8], "torch_initial_seed": torch.initial_seed()},
        "time": time.time(),
    })
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    atomic_write_json(rd.checkpoints / "latest.json", {"step": step, "path": folder.name})
    for old in sorted(rd.checkpoints.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return folder


def load_checkpoint(rd: RunDir, device: str) -> dict[str, Any] | None:
    """The latest checkpoint's state (for :meth:`ResAlign.load_state_dict`), with the torch RNG state
    under ``rng_torch``; None when the run has none."""
    from safetensors.torch import load_file

    latest = rd.checkpoints / "latest.json"
    if not latest.is_file():
        return None
    folder = rd.checkpoints / json.loads(latest.read_text())["path"]
    meta = json.loads((folder / "state.json").read_text())
    theta = load_file(folder / "theta.safetensors", device=device)
    flat = load_file(folder / "optimizer.safetensors", device=device)
    rng_torch = flat.pop("rng.torch").cpu()
    state: dict[int, dict[str, Any]] = {}
    for key, value in meta["optimizer"]["entries"].items():
        idx, name = key.split(".", 1)
        if key in flat:
            value = flat[key].reshape(value)
        state.setdefault(int(idx), {})[name] = value
    solver: dict[str, dict[str, torch.Tensor]] = {}
    if (folder / "solver.safetensors").is_file():
        for key, value in load_file(folder / "solver.safetensors", device=device).items():
            group, name = key.split("/", 1)
            solver.setdefault(group, {})[name] = value
    return {"step": meta["step"], "theta": theta, "solver": solver, "rng_torch": rng_torch,
            "optimizer": {"state": state, "param_groups": meta["optimizer"]["param_groups"]}}


def recorded_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved configuration a run directory recorded in its ``config.toml`` (settings left None
    are absent)."""
    return load_toml(Path(run_dir) / "config.toml")


def checkpoint_weights(run_dir: str | Path, base_bundle: Any, steps: set[int] | None = None
                       ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(step, UNet weights) of every checkpoint a run kept (or of those at ``steps``), in step order.

    A checkpoint holds θ (``theta.safetensors``); the UNet weights are W(θ) of the run's
    parameterization (``--params full|xattn|lora``, its options and seed from ``config.toml``) around
    the base model's weights.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    rc = recorded_config(run_dir)
    options = from_dict(ParamsOptions, rc.get("params_options", {}), where=f"{run_dir / 'config.toml'}: params_options")
    base = {n: p.detach().float() for n, p in base_bundle.unet.named_parameters()}
    param = Parameterization(rc["params"], base, options, seed=rc.get("seed", 0))
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(folder.name.split("-", 1)[1])
        if steps is not None and step not in steps:
            continue
        theta = load_file(folder / "theta.safetensors", device=str(base_bundle.device))
        yield step, {k: v.to(base_bundle.dtype) for k, v in param.merged(theta).items()}


def run_config_of(run_dir: str | Path) -> Any:
    """The resolved :class:`RunConfig` a run directory recorded in its ``config.toml``."""
    from resalign.settings.run import RunConfig, resolve

    return resolve(from_dict(RunConfig, recorded_config(run_dir), where=str(Path(run_dir) / "config.toml")))
