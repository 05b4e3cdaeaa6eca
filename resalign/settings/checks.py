"""Checks of a resolved :class:`~resalign.settings.run.RunConfig`: every name, number, option and
path, before any model is loaded or any data generated."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from resalign.core.meta import GAMMA_RULES
from resalign.core.params import PARAM_KINDS
from resalign.data.training import check_source
from resalign.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from resalign.settings.run import RunConfig


def validate(cfg: RunConfig, registry) -> dict[str, Any]:
    """Check every name, number, option and path before any long work; returns the created components."""
    from resalign.validation import check_choice, check_device, check_dtype

    if cfg.params not in PARAM_KINDS:
        raise ConfigError(f"params: {cfg.params!r} is not one of {', '.join(PARAM_KINDS)}")
    check_device(cfg.device, "device")
    check_dtype(cfg.dtype, cfg.device, "dtype")
    _check_numbers(cfg)
    check_choice(cfg.alpha_schedule, "alpha_schedule", ("constant", "sigmoid", "late-sigmoid"))
    from resalign.core.curvature import CURVATURES

    check_choice(cfg.gamma_rule, "gamma_rule", GAMMA_RULES)
    check_choice(cfg.curvature, "curvature", CURVATURES)
    if cfg.init is not None:
        init = Path(cfg.init)
        if not ((init / "model_index.json").is_file() or (init / "model" / "model_index.json").is_file()):
            raise ModelLoadError(f"init: {cfg.init!r} is neither a model folder (model_index.json) nor a run "
                                 "directory with model/")
        if cfg.params == "lora":
            raise ConfigError("init: a warm start sets θ to a model's weights; params = lora has none "
                              "(use params = xattn or full)")
    if cfg.model is not None:
        path = Path(cfg.model)
        if not path.is_dir():
            raise ModelLoadError(f"model: folder {cfg.model!r} does not exist")
        missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
        if missing:
            raise ModelLoadError(f"model: folder {cfg.model!r} lacks {', '.join(missing)} (diffusers layout expected)")
        from resalign.models.sdxl import check_sdxl_folder, is_sdxl_folder

        if is_sdxl_folder(path):
            check_sdxl_folder(path)
    else:
        from resalign.models.toy import toy_model_dir

        toy_model_dir()
    components = {
        "loss": registry.create("harmful-loss", cfg.loss, cfg.loss_options),
        "regularizer": registry.create("regularizer", cfg.regularizer, cfg.regularizer_options),
        "solver": registry.create("solver", cfg.solver, cfg.solver_options),
    }
    from resalign.validation import check_finite_tree

    for key, component in components.items():
        check_finite_tree(getattr(component, "config", None), f"{key}_options")
    for name in cfg.pool.adapters:
        registry.info("adapter", name)
    for name in cfg.pool.finetune_losses:
        registry.info("finetune-loss", name)
    for name, opts in cfg.pool.adapter_options.items():
        check_finite_tree(getattr(registry.create("adapter", name, opts), "config", None),
                          f"pool.adapter_options.{name}")
    if cfg.beta > 0 and cfg.J > 0:
        cfg.pool.configs()
    for set_name in ("harmful", "preserve", "finetune"):
        for i, src in enumerate(getattr(cfg.data, set_name)):
            check_source(src, f"data.{set_name}[{i}]")
    return components


def _check_numbers(cfg: RunConfig) -> None:
    """Finiteness and range of every number of a resolved RunConfig (and its pool, params and data)."""
    from resalign.validation import check_int, check_ints, check_number, check_numbers, check_seed

    check_number(cfg.beta, "beta", ge=0, le=1)
    check_number(cfg.alpha, "alpha", ge=0)
    check_number(cfg.alpha_end, "alpha_end", ge=0, optional=True)
    check_number(cfg.gamma, "gamma", gt=0)
    check_number(cfg.max_ft_loss_growth, "max_ft_loss_growth", gt=1, optional=True)
    check_number(cfg.outlier_factor, "outlier_factor", ge=0)
    check_number(cfg.outer_lr, "outer_lr", gt=0)
    check_number(cfg.weight_decay, "weight_decay", ge=0)
    check_number(cfg.max_grad_norm, "max_grad_norm", gt=0, optional=True)
    for name in ("J", "outer_steps", "checkpoint_every", "keep_checkpoints", "curvature_samples", "val_sims"):
        check_int(getattr(cfg, name), name, ge=0)
    if cfg.outer_steps == 0:
        raise ConfigError("outer_steps = 0 (--outer-steps): expected an integer >= 1; with no outer step "
                          "there is no unlearned model to write")
    if cfg.J == 0 and cfg.beta > 0:
        raise ConfigError(f"J = 0 with beta = {cfg.beta:g} (-J, --beta): beta > 0 needs J >= 1 simulated "
                          "fine-tunings per outer step; set -J 1 or more, or --beta 0 for plain unlearning")
    check_int(cfg.threads, "threads", ge=0, le=4096)
    check_int(cfg.quick_eval, "quick_eval", ge=0, optional=True)
    for name in ("harm_batch", "preserve_batch", "ft_size", "val_every", "val_pairs"):
        check_int(getattr(cfg, name), name, ge=1)
    check_seed(cfg.seed, "seed")
    pool = cfg.pool
    check_numbers(pool.lrs, "pool.lrs", gt=0)
    check_ints(pool.steps, "pool.steps", ge=1)
    check_int(pool.batch_size, "pool.batch_size", ge=1)
    check_number(pool.max_lr_steps, "pool.max_lr_steps", ge=0)
    for opt, lrs in pool.lrs_by_optimizer.items():
        if not isinstance(lrs, (list, tuple)):
            raise ConfigError(f"pool.lrs_by_optimizer.{opt}: expected a list of learning rates, got {lrs!r}")
        check_numbers(lrs, f"pool.lrs_by_optimizer.{opt}", gt=0)
    po = cfg.params_options
    check_int(po.rank, "params_options.rank", ge=1)
    check_number(po.alpha, "params_options.alpha", gt=0)
    check_number(po.init_std_a, "params_options.init_std_a", ge=0)
    check_number(po.init_std_b, "params_options.init_std_b", ge=0)
    data = cfg.data
    for name in ("images_per_prompt", "sample_steps", "gen_batch_size"):
        check_int(getattr(data, name), f"data.{name}", ge=1)
    check_number(data.guidance, "data.guidance", ge=0)
    for set_name in ("harmful", "preserve", "finetune"):
        for i, src in enumerate(getattr(data, set_name)):
            check_int(src.n, f"data.{set_name}[{i}].n", ge=0)
            check_seed(src.seed, f"data.{set_name}[{i}].seed")
