"""A run's pieces before its first outer step (``resalign run``, ``resalign ablate``): the model, the
DiffusionContext, D_harmful / D_preserve / D_FT and the Alg. 2 trainer, wired from a resolved RunConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resalign.core.meta import MethodSettings, ResAlign
from resalign.core.split import Ranks
from resalign.errors import ConfigError
from resalign.settings.checks import validate
from resalign.settings.run import RunConfig, method_settings, require_resolved


@dataclass
class Prepared:
    """Everything a run (or an ablation) builds before its first outer step."""

    bundle: Any
    ctx: Any  # DiffusionContext
    data: Any  # TrainingData
    settings: MethodSettings
    parameterization: Any  # Parameterization
    components: dict[str, Any]
    trainer: ResAlign


def prepare(cfg: RunConfig, data_dir: Path | None, *, registry=None, components: dict[str, Any] | None = None,
            progress=None) -> Prepared:
    """Load the model, build the DiffusionContext, the datasets (cached in ``data_dir``; a temporary
    folder when None) and the Alg. 2 trainer at the original model, from a resolved ``cfg``."""
    import tempfile

    from resalign.components import DiffusionContext, needs
    from resalign.core.functional import FunctionalUNet
    from resalign.core.params import Parameterization
    from resalign.data.training import build_training_data
    from resalign.models.bundle import DTYPES
    from resalign.models.loaders import load_bundle
    from resalign.registry import get_registry

    require_resolved(cfg, "prepare")
    registry = registry or get_registry()
    components = components or validate(cfg, registry)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    bundle = load_bundle(registry, cfg.model, cfg.device)
    unet = bundle.unet.float().requires_grad_(False).eval()
    compute_dtype = DTYPES[cfg.dtype] if cfg.dtype != "fp32" else None
    model = FunctionalUNet(unet, compute_dtype=compute_dtype, checkpointing=cfg.gradient_checkpointing)
    ctx = DiffusionContext(model=model, theta0=model.base_params(), schedule=bundle.noise_schedule(),
                           uncond=bundle.encode_prompts([""]).float())
    with tempfile.TemporaryDirectory(prefix="resalign-data-") as tmp:
        data = build_training_data(
            cfg.data, bundle, Path(data_dir) if data_dir is not None else Path(tmp), cfg.seed,
            with_anchor=needs(components["loss"], "anchor"), progress=progress or (lambda name, done, total: None),
        )
    settings = method_settings(cfg)
    parameterization = Parameterization(cfg.params, ctx.theta0, cfg.params_options, seed=cfg.seed)
    trainer = ResAlign(
        ctx, parameterization, harmful_loss=components["loss"], regularizer=components["regularizer"],
        solver=components["solver"], pool=cfg.pool, data=data, settings=settings, registry=registry,
        split=Ranks(),
    )
    if cfg.init:
        warm_start(trainer, load_bundle(registry, _model_of(cfg.init), cfg.device), cfg.init)
    return Prepared(bundle, ctx, data, settings, parameterization, components, trainer)


def _model_of(path: str) -> str:
    """A model folder, or the ``model/`` of a run directory."""
    p = Path(path)
    return str(p / "model") if (p / "model" / "model_index.json").is_file() else str(p)


def warm_start(trainer: ResAlign, init_bundle: Any, where: str) -> None:
    """θ starts at ``init_bundle``'s UNet (``--set init=DIR``): the run hardens that model, while the base
    model stays the regularizer's reference. Outside θ the two models must agree (params = xattn keeps
    the base weights there)."""
    weights = {k: v.detach().float() for k, v in init_bundle.unet.state_dict().items()}
    param = trainer.param
    if param.kind == "lora":
        raise ConfigError(f"init {where!r}: a warm start sets θ to a model's weights; params = lora has none "
                          "(use params = xattn or full)")
    base = trainer.ctx.theta0
    missing = [k for k in trainer.theta if k not in weights]
    if missing or set(weights) != set(base):
        raise ConfigError(f"init {where!r}: its UNet does not have the base model's parameters "
                          f"({len(missing)} of θ missing)")
    outside = [k for k in base if k not in trainer.theta and not torch.allclose(weights[k], base[k].float())]
    if outside:
        raise ConfigError(f"init {where!r}: differs from the base model outside θ (params = {param.kind}) in "
                          f"{len(outside)} tensors, e.g. {outside[0]}; use params = full")
    with torch.no_grad():
        for k, v in trainer.theta.items():
            v.copy_(weights[k].to(v))
