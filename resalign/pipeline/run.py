"""``resalign run``: unlearn a harmful concept with ResAlign (Alg. 2) and write a run directory.

Public API (used by ``resalign compare`` and scripts)::

    cfg = resalign.config.from_dict(RunConfig, {"loss": "esd", "adapt": ["lora"], "outer_steps": 10})
    run_dir = execute(cfg, Path("runs/esd-lora"))
    bundle = T2IBundle.load(run_dir / "model")

Settings left ``None`` take the value of the preset: ``toy`` (the embedded toy world; sized so a run
finishes in minutes on two CPU cores) or ``sd`` (the paper's settings for Stable Diffusion v1.x).
``preset = "auto"`` picks ``toy`` without ``--model`` (or for a toy model folder) and ``sd`` otherwise.
The run directory records the resolved configuration in ``config.toml``.

Under ``torchrun`` every rank runs :func:`execute`: each rank computes its share of the simulations of
every outer step, balanced by their predicted costs (:class:`resalign.core.split.Ranks`), every rank
takes the same step, and
rank 0 alone writes the run directory, checkpoints, metrics and progress. Rank 0's configuration,
cached data and checkpoint reach the other ranks over the process group.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resalign import distributed
from resalign.checkpoints import load_checkpoint as _load_checkpoint
from resalign.checkpoints import save_checkpoint as _save_checkpoint
from resalign.config import current_names, deep_merge, from_dict, load_toml, to_dict
from resalign.core.health import simulation_summary, summary_markdown
from resalign.core.meta import GAMMA_RULES, ConfigPool, MethodSettings, ResAlign
from resalign.core.params import PARAM_KINDS, ParamsOptions
from resalign.core.problem import MAX_FT_LOSS_GROWTH
from resalign.core.split import Ranks
from resalign.errors import ConfigError, ModelLoadError, ResAlignError, RunInterrupted
from resalign.pipeline.data import DataConfig, SourceConfig, check_source
from resalign.rundir import RunDir

PRESET_NAMES = ("auto", "toy", "sd")


@dataclass
class RunConfig:
    """Every setting of ``resalign run`` (``None``: the preset's value)."""

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
    #: drop a simulation whose |L_harm(θ_FT)| exceeds this many times its outer step's median (0: off)
    outlier_factor: float = 10.0
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


#: Preset values of the settings left None. ``toy`` is tuned for the embedded toy world on a 2-core
#: CPU (docs/method.md); ``sd`` follows the paper (Sec. 4.1, B.4) and the authors' scripts.
PRESETS: dict[str, dict[str, Any]] = {
    "toy": {
        # one thread: the toy UNet's kernels are too small to gain from a second one, and two
        # spinning OpenMP threads slow down many times over on a core shared with another process
        "threads": 1,
        "params": "xattn",
        "gradient_checkpointing": False,
        "offload_outer_state": False,
        # concept ablation towards the anchor (a plain circle): with it, ResAlign's toy model was the
        # least harmful after benign fine-tuning and within 5 points of the base model's benign
        # prompt accuracy; with GA neither held (docs/method.md, docs/evaluation.md)
        "loss": "ca",
        # ESD's η = 1 target is the unconditional prediction, which draws rings at the toy model's
        # unconditional rate: η = 3 (negative guidance past it) unlearned to 0.13 in 30 steps, η = 1 to 0.75
        "loss_options": {"ga": {"cap": 0.3}, "esd": {"eta": 3.0}},
        "curvature": "gauss-newton",
        # the curvature of one D_FT pair: products 8x cheaper, fidelity unchanged (docs/performance.md)
        "curvature_samples": 1,
        "beta": 0.8,
        "alpha": 1.0,
        "alpha_schedule": "constant",
        "J": 2,
        "outer_steps": 30,
        "outer_lr": 1e-3,
        "max_grad_norm": 1.0,
        "harm_batch": 8,
        "preserve_batch": 16,
        "ft_size": 8,
        "checkpoint_every": 10,
        # simulations as long as a few hundred steps of the downstream recipe need to show the rebound:
        # full-parameter Adam at lr 1e-4 for 30 or 60 steps, batch 1. Shorter runs barely move
        # L_harm, so β > 0 changed nothing; Adam at 3e-4 or 1e-3 and SGD at 0.03 or 0.1 diverge on
        # this model (docs/results.md records each pool tried)
        "pool": {
            "lrs": [1e-4],
            "steps": [30, 60],
            "optimizers": ["adam"],
            "finetune_losses": ["denoise", "prior_preservation"],
            "adapters": ["full"],
            "batch_size": 1,
            "max_lr_steps": 0.0,
            "adapter_options": {"lora": {"rank": 4, "alpha": 4.0}},
        },
        "data": {
            "harmful": [{"source": "toy:harmful", "n": 64, "seed": 0}],
            "preserve": [{"source": "toy:preservation", "n": 64, "seed": 1}],
            "finetune": [{"source": "toy:preservation", "n": 48, "seed": 2}, {"source": "toy:harmful", "n": 16, "seed": 3}],
            "concept": "ring",
            "anchor": "circle",
            "images_per_prompt": 1,
            "sample_steps": 10,
            "guidance": 2.0,
            "gen_batch_size": 64,
        },
    },
    "sd": {
        "threads": 0,
        "params": "full",
        "loss": "ga",
        # the memory of an SD-1.5 outer step (docs/performance.md, benchmarks/bench_memory.py)
        "gradient_checkpointing": True,
        "offload_outer_state": True,
        "loss_options": {},
        "curvature": "gauss-newton",
        # the curvature's graph at 64x64 latents holds about twice a training step's activations per
        # pair: one pair keeps the products' memory and time at one training step's scale (docs/performance.md)
        "curvature_samples": 1,
        "beta": 0.8,
        "alpha": 1.6,
        "alpha_schedule": "sigmoid",
        "alpha_end": 2.0,
        "J": 3,
        "outer_steps": 160,
        "outer_lr": 1e-5,
        "max_grad_norm": 1.0,
        "harm_batch": 4,
        "preserve_batch": 4,
        "ft_size": 4,
        "checkpoint_every": 20,
        "pool": {
            "lrs": [1e-4, 1e-5, 1e-6],
            "steps": [5, 10, 20, 30],
            "optimizers": ["sgd", "adam"],
            "finetune_losses": ["denoise", "prior_preservation"],
            "adapters": ["full", "lora"],
            "batch_size": 1,
            "max_lr_steps": 1e-3,
            "adapter_options": {"lora": {"rank": 4, "alpha": 4.0}},
        },
        "data": {
            "harmful": [{"source": "templates:harmful"}],
            "preserve": [{"source": "templates:preserve"}],
            "finetune": [{"source": "templates:finetune"}],
            "concept": "nudity",
            "anchor": "a person wearing clothes",
            "images_per_prompt": 2,
            "sample_steps": 30,
            "guidance": 7.5,
            "gen_batch_size": 4,
        },
    },
}

#: Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("outer_steps", "device", "threads", "checkpoint_every", "keep_checkpoints")


# --------------------------------------------------------------------------- configuration


def preset_of(model: str | None, preset: str = "auto") -> str:
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
    return "toy" if "ResAlignToyPipeline" in text else "sd"


def load_run_config(raw: dict[str, Any], config_file: str | Path | None = None) -> RunConfig:
    """A RunConfig from a TOML file and overrides (CLI flags), merged onto the preset at the dict level.

    Tables (``[pool]``, ``[data]``, ``[params_options]``) merge key by key with the preset's, so a
    file may set only ``pool.lrs``. Unknown keys raise :class:`ConfigError` naming the key.
    """
    base = load_toml(config_file) if config_file else {}
    merged = deep_merge(current_names(RunConfig, base), current_names(RunConfig, raw))
    return resolve(from_dict(RunConfig, _with_preset(merged), where="config"))


def _with_preset(d: dict[str, Any]) -> dict[str, Any]:
    for key in ("model", "preset", "loss"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ConfigError(f"config.{key}: expected a string, got {d[key]!r}")
    name = preset_of(d.get("model"), d.get("preset", "auto"))
    preset = dict(PRESETS[name])
    loss = d.get("loss") or preset["loss"]
    preset["loss_options"] = dict(preset["loss_options"].get(loss, {}))
    return deep_merge(preset, d)


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the settings left None from the preset; ``adapt`` narrows the pool's adapters."""
    name = preset_of(cfg.model, cfg.preset)
    preset = PRESETS[name]
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


def validate(cfg: RunConfig, registry) -> dict[str, Any]:
    """Check every name, number, option and path before any long work; returns the created components."""
    from resalign.validation import check_choice, check_device, check_dtype

    if cfg.params not in PARAM_KINDS:
        raise ConfigError(f"params: {cfg.params!r} is not one of {', '.join(PARAM_KINDS)}")
    check_device(cfg.device, "device")
    check_dtype(cfg.dtype, cfg.device, "dtype")
    _check_numbers(cfg)
    check_choice(cfg.alpha_schedule, "alpha_schedule", ("constant", "sigmoid"))
    from resalign.core.curvature import CURVATURES

    check_choice(cfg.gamma_rule, "gamma_rule", GAMMA_RULES)
    check_choice(cfg.curvature, "curvature", CURVATURES)
    if cfg.model is not None:
        path = Path(cfg.model)
        if not path.is_dir():
            raise ModelLoadError(f"model: folder {cfg.model!r} does not exist")
        missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
        if missing:
            raise ModelLoadError(f"model: folder {cfg.model!r} lacks {', '.join(missing)} (diffusers layout expected)")
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
    for name in ("J", "outer_steps", "checkpoint_every", "keep_checkpoints", "curvature_samples"):
        check_int(getattr(cfg, name), name, ge=0)
    check_int(cfg.threads, "threads", ge=0, le=4096)
    for name in ("harm_batch", "preserve_batch", "ft_size"):
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


# --------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress display: data generation, then outer steps with loss terms, ‖h‖ and ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tasks: dict[str, Any] = {}
        self.progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, name: str, completed: int, total: int, info: str = "") -> None:
        if self.progress is None:
            return
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, info=info)
        self.progress.update(self.tasks[name], completed=completed, total=total, info=info)

    def log(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)


def _step_info(m: dict[str, Any]) -> str:
    parts = [f"L_harm {m['loss_harm']:+.4f}", f"R {m['loss_reg']:.4f}"]
    if "harm_ft_mean" in m:
        parts.append(f"L_harm(θ_FT) {m['harm_ft_mean']:+.4f}")
        parts.append(f"‖h‖ {m['hypergrad_norm']:.3g}")
    parts.append(f"‖G‖ {m['grad_norm']:.3g}")
    return "  ".join(parts)


# --------------------------------------------------------------------------- the run


def _load_bundle(cfg: RunConfig, registry):
    loader = None
    if cfg.model is None:
        loader = registry.create("model", "toy")
    else:
        # every registered loader, a plugin's included; the generic diffusers one last
        for name in sorted(registry.names("model"), key=lambda n: n == "diffusers"):
            candidate = registry.create("model", name)
            if candidate.can_load(cfg.model):
                loader = candidate
                break
        if loader is None:
            raise ModelLoadError(f"model: no loader can read {cfg.model!r}")
    # fp32 throughout: ``dtype`` is the autocast dtype of the UNet passes (the master weights stay
    # fp32); the frozen text encoder and VAE run once per dataset, and the saved model keeps their dtype
    return loader.load(cfg.model, device=cfg.device, dtype="fp32")


def _check_resume(cfg: RunConfig, rd: RunDir) -> None:
    saved_file = rd.file("config.toml")
    if not saved_file.is_file():
        raise ConfigError(f"--resume: {str(rd.path)!r} has no config.toml to resume")
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
    folder when None) and the Alg. 2 trainer at the original model."""
    import tempfile

    from resalign.components import DiffusionContext, needs
    from resalign.core.functional import FunctionalUNet
    from resalign.core.params import Parameterization
    from resalign.models.bundle import DTYPES
    from resalign.pipeline.data import build_training_data
    from resalign.registry import get_registry

    cfg = resolve(cfg)
    registry = registry or get_registry()
    components = components or validate(cfg, registry)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    bundle = _load_bundle(cfg, registry)
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
    settings = MethodSettings(
        beta=cfg.beta, alpha=cfg.alpha, alpha_schedule=cfg.alpha_schedule, alpha_end=cfg.alpha_end, J=cfg.J,
        gamma=cfg.gamma, outer_steps=cfg.outer_steps, outer_lr=cfg.outer_lr, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, harm_batch=cfg.harm_batch, preserve_batch=cfg.preserve_batch,
        ft_size=cfg.ft_size, seed=cfg.seed, fixed_ft_data=cfg.fixed_ft_data, curvature=cfg.curvature,
        gamma_rule=cfg.gamma_rule, curvature_samples=cfg.curvature_samples,
        max_ft_loss_growth=cfg.max_ft_loss_growth, outlier_factor=cfg.outlier_factor,
        offload_outer_state=cfg.offload_outer_state,
    )
    parameterization = Parameterization(cfg.params, ctx.theta0, cfg.params_options, seed=cfg.seed)
    trainer = ResAlign(
        ctx, parameterization, harmful_loss=components["loss"], regularizer=components["regularizer"],
        solver=components["solver"], pool=cfg.pool, data=data, settings=settings, registry=registry,
        split=Ranks(),
    )
    return Prepared(bundle, ctx, data, settings, parameterization, components, trainer)


def execute(cfg: RunConfig, out: Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Run ResAlign with ``cfg``, writing the run directory ``out``; returns ``out``.

    ``out/model`` is the unlearned model in diffusers layout (loads with ``T2IBundle.load``).
    ``resume=True`` continues from the latest checkpoint in ``out`` (the configuration must match,
    except ``outer_steps``, ``device``, ``threads`` and checkpoint settings). Ctrl-C saves a checkpoint
    and raises :class:`RunInterrupted`.
    """
    from resalign.eval.report import TidyReport
    from resalign.registry import get_registry

    cfg = resolve(cfg)
    distributed.init(cfg.device)
    cfg = distributed.broadcast_object(cfg)  # rank 0's (it alone may read --resume's config.toml)
    registry = get_registry()
    components = validate(cfg, registry)
    out = Path(out)
    rd = distributed.on_main(lambda: _open_run_dir(cfg, out, resume))
    main = rd is not None
    local = dataclasses.replace(cfg, device=distributed.local_device(cfg.device))

    t_start = time.perf_counter()
    with _Progress(progress and main) as bar:
        prep = prepare(local, rd.path / "data" if main else None, registry=registry, components=components,
                       progress=lambda name, done, total: bar.update(f"generate {name}", done, total))
        bundle, trainer = prep.bundle, prep.trainer
        if resume:
            state = distributed.broadcast_object(distributed.on_main(lambda: _load_checkpoint(rd, "cpu")))
            if state is not None:
                torch.set_rng_state(state.pop("rng_torch"))
                trainer.load_state_dict(state)
            if main:
                rows = [r for r in rd.read_metrics() if r.get("step", 0) <= trainer.step]
                rd.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            bar.log(f"resuming at outer step {trainer.step}/{cfg.outer_steps}")

        stopped = False
        bar.update("outer step", trainer.step, cfg.outer_steps)
        try:
            while trainer.step < cfg.outer_steps:
                metrics = trainer.outer_step()
                if main:
                    rd.append_metrics(metrics)
                    bar.update("outer step", trainer.step, cfg.outer_steps, _step_info(metrics))
                    if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                        _save_checkpoint(rd, trainer, cfg.keep_checkpoints)
                stopped = distributed.broadcast_object(_plugin_stops(registry, trainer.step, metrics) if main else None)
                if stopped:
                    bar.log(f"a plugin stopped the run after outer step {trainer.step}")
                    break
        except KeyboardInterrupt:
            folder = _save_checkpoint(rd, trainer, cfg.keep_checkpoints) if main else out / "checkpoints"
            raise RunInterrupted(
                f"interrupted after outer step {trainer.step}/{cfg.outer_steps}; checkpoint saved to {folder}; "
                f"continue with: resalign run --resume --out {out}"
            ) from None
        if not main:
            return out
        if trainer.step and (not cfg.checkpoint_every or trainer.step % cfg.checkpoint_every):
            _save_checkpoint(rd, trainer, cfg.keep_checkpoints)
        bundle.save(rd.model_dir, unet_state=trainer.unlearned_weights())

    report = TidyReport("run", settings=to_dict(cfg))
    rows = rd.read_metrics()
    health = simulation_summary(rows)
    report.settings["simulations"] = health
    if progress and health["simulations"]:
        _say_health(health)
    if rows:
        last = rows[-1]
        for key in ("loss_harm", "loss_reg", "harm_ft_mean", "hypergrad_norm", "objective"):
            if key in last:
                report.add(last[key], model="resalign", metric=key, step=last["step"])
    report.add(time.perf_counter() - t_start, model="resalign", metric="wall_time_s")
    rd.write_json("report.json", report.to_dict())
    rd.write_text("report.md", _report_md(cfg, rows, stopped) + "\n".join(["", *summary_markdown(health)]))
    registry.pm.hook.on_run_end(run_dir=str(rd.path), report=report.to_dict())
    return rd.path


def _open_run_dir(cfg: RunConfig, out: Path, resume: bool) -> RunDir:
    """The run directory of ``execute`` (locked), checked for ``--resume`` and with ``config.toml`` written."""
    rd = RunDir(out, command="run", resume=resume)
    if resume:
        _check_resume(cfg, rd)
    elif (rd.checkpoints / "latest.json").is_file():
        raise ConfigError(f"--out {str(out)!r} holds a run; pass --resume to continue it or choose a new folder")
    rd.write_config(to_dict(cfg))
    return rd


def _plugin_stops(registry, step: int, metrics: dict[str, Any]) -> bool:
    """Whether a plugin's ``on_outer_step`` asked to stop the run."""
    answers = registry.pm.hook.on_outer_step(
        step=step, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return any(a is True for a in answers)


def _say_health(health: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    mol = health["median_omega_lambda"]
    console.print(f"simulations: {health['kept']} of {health['simulations']} kept, {health['dropped']} dropped; "
                  f"{health['halved']} solves halved ω, {health['fallback']} fell back, {health['first_order']} in "
                  f"effect first-order" + (f"; median ω·λ_max {mol:.3g}" if mol is not None else ""), highlight=False)
    for w in health["warnings"]:
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False)


def _report_md(cfg: RunConfig, rows: list[dict[str, Any]], stopped: bool) -> str:
    lines = [
        "# resalign run",
        "",
        f"loss `{cfg.loss}`, regularizer `{cfg.regularizer}`, solver `{cfg.solver}`, params `{cfg.params}`, "
        f"β = {cfg.beta}, α = {cfg.alpha}, J = {cfg.J}, γ = {cfg.gamma}, adapters {', '.join(cfg.pool.adapters)}, "
        f"{len(rows)} of {cfg.outer_steps} outer steps{' (stopped by a plugin)' if stopped else ''}.",
        "",
        "| step | L_harm | R | mean L_harm(θ_FT) | ‖h‖ | ‖G‖ | s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['loss_harm']:.4f} | {r['loss_reg']:.4f} | "
            f"{r.get('harm_ft_mean', float('nan')):.4f} | {r.get('hypergrad_norm', float('nan')):.3g} | "
            f"{r['grad_norm']:.3g} | {r['time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["PRESETS", "RunConfig", "SourceConfig", "execute", "load_run_config", "resolve", "validate",
           "ResAlignError"]
