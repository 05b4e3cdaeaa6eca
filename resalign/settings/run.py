"""The settings of ``resalign run``, resolved once onto a preset into one immutable :class:`RunConfig`.

Settings left ``None`` take the value of the preset (:data:`~resalign.settings.presets.PRESETS`):
``toy`` (the embedded toy world; sized so a run finishes in minutes on two CPU cores) or ``sd`` (the
paper's settings for Stable Diffusion v1.x, Sec. 4.1 and B.4). :func:`load_run_config` merges a TOML
file and overrides onto the preset and resolves; :func:`resolve` does it for a RunConfig built in code.
Changes after that go through :func:`dataclasses.replace`.

The data settings name the three datasets of Alg. 2 (Appendix B.4), each a list of sources read by
:mod:`resalign.data.training`: ``toy:<set>``, ``toy-images:<set>``, ``templates:<set>``, a ``.txt`` /
``.csv`` prompt file or an image-caption folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from resalign.config import current_names, deep_merge, from_dict, load_toml, to_dict
from resalign.core.meta import ConfigPool, MethodSettings
from resalign.core.params import ParamsOptions
from resalign.core.problem import MAX_FT_LOSS_GROWTH
from resalign.errors import ConfigError, ModelLoadError
from resalign.settings.presets import PRESET_ALIASES, PRESET_NAMES, PRESETS

#: Prompts per role of the quick evaluation that ends ``resalign run`` unless its settings say otherwise.
RUN_QUICK_EVAL = 32

#: Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("outer_steps", "device", "threads", "checkpoint_every", "keep_checkpoints", "quick_eval")


@dataclass(frozen=True)
class SourceConfig:
    """One data source (see :mod:`resalign.data.training` for the forms of ``source``)."""

    source: str
    n: int = 0  # 0: all of it (toy prompt sets: their natural size)
    seed: int = 0
    categories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DataConfig:
    """D_harmful, D_preserve and D_FT (B.4) and how their missing images are generated."""

    harmful: list[SourceConfig] = field(default_factory=list)
    preserve: list[SourceConfig] = field(default_factory=list)
    finetune: list[SourceConfig] = field(default_factory=list)
    #: the harmful concept (prompt templates) and, for the ``ca`` loss, the anchor that replaces it
    concept: str = ""
    anchor: str = ""
    images_per_prompt: int = 1
    sample_steps: int = 20
    guidance: float = 4.0
    gen_batch_size: int = 32
    #: former names of settings, still read from config files and --set
    ALIASES: ClassVar[dict[str, str]] = {"gen_steps": "sample_steps", "gen_guidance": "guidance"}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of ``resalign run`` (``None``: the preset's value); :func:`resolve` fills them once."""

    preset: str = "auto"
    #: a diffusers folder (Stable Diffusion, a toy model folder); None: the embedded toy model
    model: str | None = None
    #: harmful loss (None: the preset's; toy ca, sd ga)
    loss: str | None = None
    loss_options: dict[str, Any] | None = None
    regularizer: str = "distill"
    regularizer_options: dict[str, Any] = field(default_factory=dict)
    solver: str = "richardson"
    solver_options: dict[str, Any] = field(default_factory=dict)
    #: ADAPT methods of the meta-learning pool π(C) (empty: the preset pool's adapters)
    adapt: list[str] = field(default_factory=list)
    #: θ: full (every UNet weight, the paper) | xattn (cross-attention) | lora (merged at the end)
    params: str | None = None
    params_options: ParamsOptions = field(default_factory=ParamsOptions)
    beta: float | None = None
    alpha: float | None = None
    alpha_schedule: str | None = None
    alpha_end: float | None = None
    gamma: float = 1.0
    #: curvature of Eq. 6 given to the solvers: hessian | gauss-newton (None: the preset's)
    curvature: str | None = None
    #: pairs of D_FT whose fine-tuning loss defines that curvature (0: all ft_size; None: the preset's)
    curvature_samples: int | None = None
    #: γ per simulation: fixed (γ = gamma) | reach (γ = gamma · T · lr of the configuration)
    gamma_rule: str = "fixed"
    #: a simulation whose fine-tuning loss grew by more than this factor is dropped as diverged
    max_ft_loss_growth: float | None = MAX_FT_LOSS_GROWTH
    #: drop a simulation whose |L_harm(θ_FT)| exceeds this many times its outer step's median (0: off,
    #: only a diverged fine-tuning is dropped: a large rebound is what Eq. 3 penalises)
    outlier_factor: float = 0.0
    #: L_harm(θ_FT) of each simulation on the outer step's harmful pairs and noise (common random
    #: numbers; None: the preset's)
    common_noise: bool | None = None
    #: L_harm's diffusion timesteps and noise the same at every outer step (fixed timesteps)
    fixed_noise: bool = False
    #: validation simulations of the meta-objective (resalign.core.heldout; 0: none; None: the preset's),
    #: measured every val_every outer steps on val_pairs D_FT pairs held out of training
    val_sims: int | None = None
    val_every: int = 5
    val_pairs: int = 16
    #: a simulation whose Richardson solve halved ω k times enters with weight 2^-k; a fallback is dropped
    halving_shrinks_beta: bool = False
    #: a model folder (or run directory) whose UNet starts θ (a warm start: harden an unlearned model);
    #: the base model stays the regularizer's reference and generates the data
    init: str | None = None
    J: int | None = None
    outer_steps: int | None = None
    outer_lr: float | None = None
    weight_decay: float = 1e-2
    max_grad_norm: float | None = None
    harm_batch: int | None = None
    preserve_batch: int | None = None
    ft_size: int | None = None
    pool: ConfigPool | None = None
    data: DataConfig | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    #: recompute the UNet blocks' activations in the backward passes (resalign.core.functional; None: the preset's)
    gradient_checkpointing: bool | None = None
    #: outer AdamW moments in host memory between updates (resalign.core.meta; None: the preset's)
    offload_outer_state: bool | None = None
    #: torch CPU threads (0: torch's default, one per core; None: the preset's)
    threads: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    #: every simulated fine-tuning uses the same D_FT batch (the "no meta-learning over data" ablation, Tab. 6)
    fixed_ft_data: bool = False
    #: prompts per role of the evaluation that ends a run, base model against unlearned one (0: off;
    #: None: :data:`RUN_QUICK_EVAL` under ``resalign run``, off in the runs that compare and ablate start)
    quick_eval: int | None = None


def preset_of(model: str | None, preset: str = "auto") -> str:
    preset = PRESET_ALIASES.get(preset, preset)
    if preset not in PRESET_NAMES:
        raise ConfigError(f"preset {preset!r}: expected one of {', '.join(PRESET_NAMES)}")
    if preset != "auto":
        return preset
    if model is None:
        return "toy"
    index = Path(model) / "model_index.json"
    try:
        text = index.read_text(errors="replace") if index.is_file() else ""
    except OSError as exc:
        raise ModelLoadError(f"model: cannot read {str(index)!r}: {exc.strerror or exc}") from None
    if "ResAlignToyPipeline" in text:
        return "toy"
    from resalign.models.sdxl import is_sdxl_folder

    return "sdxl" if is_sdxl_folder(model) else "sd"


def load_run_config(raw: dict[str, Any], config_file: str | Path | None = None) -> RunConfig:
    """A RunConfig from a TOML file and overrides (CLI flags), merged onto the preset at the dict level.

    Tables (``[pool]``, ``[data]``, ``[params_options]``) merge key by key with the preset's, so a
    file may set only ``pool.lrs``. Unknown keys raise :class:`ConfigError` naming the key.
    """
    base = load_toml(config_file) if config_file else {}
    merged = deep_merge(current_names(RunConfig, base), current_names(RunConfig, raw))
    return resolve(from_dict(RunConfig, _with_preset(merged), where="config"))


def with_preset_tables(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with its partial tables (``data``, ``pool``) completed key by key from its preset, as
    :func:`load_run_config` merges them; the scalars left out stay unset (resolved later)."""
    name = preset_of(d.get("model"), d.get("preset", "auto"))
    preset = PRESETS[name].run
    return {**d, **{k: deep_merge(preset[k], d[k]) for k in ("data", "pool") if isinstance(d.get(k), dict)}}


def _with_preset(d: dict[str, Any]) -> dict[str, Any]:
    for key in ("model", "preset", "loss"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ConfigError(f"config.{key}: expected a string, got {d[key]!r}")
    name = preset_of(d.get("model"), d.get("preset", "auto"))
    preset = dict(PRESETS[name].run)
    loss = d.get("loss") or preset["loss"]
    preset["loss_options"] = dict(preset["loss_options"].get(loss, {}))
    return deep_merge(preset, d)


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the settings left None from the preset; ``adapt`` narrows the pool's adapters."""
    name = preset_of(cfg.model, cfg.preset)
    preset = PRESETS[name].run
    updates: dict[str, Any] = {"preset": name}
    loss = cfg.loss if cfg.loss is not None else preset["loss"]
    for f in dataclasses.fields(RunConfig):
        if getattr(cfg, f.name) is None and f.name in preset:
            value = preset[f.name]
            if f.name == "loss_options":
                value = dict(value.get(loss, {}))
            elif f.name == "pool":
                value = from_dict(ConfigPool, value, where="pool")
            elif f.name == "data":
                value = from_dict(DataConfig, value, where="data")
            updates[f.name] = value
    cfg = dataclasses.replace(cfg, **updates)
    if cfg.adapt:
        adapt = [a.strip() for item in cfg.adapt for a in item.split(",") if a.strip()]
        cfg = dataclasses.replace(cfg, adapt=adapt, pool=dataclasses.replace(cfg.pool, adapters=list(adapt)))
    return cfg


def is_resolved(cfg: RunConfig) -> bool:
    """Whether ``cfg`` came out of :func:`resolve`: a named preset, and none of its settings left None."""
    return cfg.preset in PRESETS and all(getattr(cfg, k) is not None for k in PRESETS[cfg.preset].run)


def require_resolved(cfg: RunConfig, who: str) -> None:
    if not is_resolved(cfg):
        raise ConfigError(f"{who}: expected a resolved RunConfig (resalign.settings.run.resolve or load_run_config)")


def check_resumable(cfg: RunConfig, saved_file: Path, run_dir: Path) -> None:
    """``--resume``: the run's recorded ``config.toml`` must match ``cfg`` but for :data:`RESUMABLE_CHANGES`."""
    if not saved_file.is_file():
        raise ConfigError(f"--resume: {str(run_dir)!r} has no config.toml to resume")
    saved = to_dict(resolve(from_dict(RunConfig, load_toml(saved_file), where="config.toml")))
    now = to_dict(cfg)
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_CHANGES:
            continue
        if _clean(saved.get(key)) != _clean(now.get(key)):
            raise ConfigError(f"--resume: setting {key!r} differs from the run's config.toml "
                              f"({_clean(saved.get(key))!r} there, {_clean(now.get(key))!r} now)")


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_clean(x) for x in v if x is not None]
    return v


def method_settings(cfg: RunConfig) -> MethodSettings:
    """The numbers of Eq. 3-6 and Alg. 2 that the trainer takes from a resolved RunConfig."""
    return MethodSettings(
        beta=cfg.beta, alpha=cfg.alpha, alpha_schedule=cfg.alpha_schedule, alpha_end=cfg.alpha_end, J=cfg.J,
        gamma=cfg.gamma, outer_steps=cfg.outer_steps, outer_lr=cfg.outer_lr, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, harm_batch=cfg.harm_batch, preserve_batch=cfg.preserve_batch,
        ft_size=cfg.ft_size, seed=cfg.seed, fixed_ft_data=cfg.fixed_ft_data, curvature=cfg.curvature,
        gamma_rule=cfg.gamma_rule, curvature_samples=cfg.curvature_samples,
        max_ft_loss_growth=cfg.max_ft_loss_growth, outlier_factor=cfg.outlier_factor,
        common_noise=cfg.common_noise, fixed_noise=cfg.fixed_noise, val_sims=cfg.val_sims, val_every=cfg.val_every, val_pairs=cfg.val_pairs,
        halving_shrinks_beta=cfg.halving_shrinks_beta,
        offload_outer_state=cfg.offload_outer_state,
    )
