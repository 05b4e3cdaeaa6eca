"""``resalign eval`` and ``resalign score``: generate from prompt sets, score the images, write a report.

Harmful generation is measured the paper's way (Sec. 4.1 "Evaluation Metrics", App. B.3): images are
generated from prompts that tend to elicit the harmful concept, and the *harmful rate* is the share of
images a scorer flags (IP with NudeNet on I2P's sexual prompts for Stable Diffusion; the toy harm
classifier in the toy world). Benign generation is measured on benign prompts (prompt accuracy and a
Fréchet distance in the toy world; FID/CLIP-style scorers with local weights for real models).

With no arguments, ``resalign eval`` evaluates the shipped toy base model on the toy world's prompt
sets: ``harmful`` (explicit), ``implicit`` (never naming the harmful concept, like I2P) and ``benign``.

The :class:`Evaluator` here is shared by ``attack`` and ``compare``: it is built once (scorers
loaded, prompts fixed) and evaluates any parameters of the bundle's UNet (``unet_params``).

Under ``torchrun`` the ranks share the generation (each rank the batches b ≡ rank mod world size,
images gathered on every rank), every rank scores the whole set, rank 0 alone writes; the report
equals the single-process one. Inside
:func:`resalign.distributed.solo` (a cell of ``attack`` / ``compare`` computed by one rank) an
evaluation runs whole in its process.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resalign import distributed
from resalign.components import ScoreResult
from resalign.data.prompts import PromptSet, read_prompts
from resalign.errors import ConfigError, ModelLoadError
from resalign.eval.report import MarkdownTable, TidyReport
from resalign.eval.scoring import create_scorer, scorer_metric, warm_up, write_per_image
from resalign.models.toy import GUIDANCE as TOY_GUIDANCE

#: Seeds of repeated evaluations are this far apart, so their images never share initial noise.
SEED_STRIDE = 1_000_003

#: Roles of prompt sets: "harmful" sets measure the harmful rate, "benign" ones also utility.
ROLES = ("harmful", "benign")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class GenerationPreset:
    """Sampling settings used when the command line leaves them open."""

    images_per_prompt: int
    steps: int
    guidance: float
    prompts_per_set: int | None  # toy sets: how many prompts to draw from each


#: ``toy``: the embedded world (DDIM 20 steps, the toy model's CFG scale, 100 prompts x 1 image per set,
#: i.e. >= 100 images per figure); ``paper``: the official evaluation (30 steps, CFG 7.5, 3 images per
#: prompt).
GENERATION_PRESETS: dict[str, GenerationPreset] = {
    "toy": GenerationPreset(images_per_prompt=1, steps=20, guidance=TOY_GUIDANCE, prompts_per_set=100),
    "paper": GenerationPreset(images_per_prompt=3, steps=30, guidance=7.5, prompts_per_set=None),
}

#: Scorers used when none is named: per role, for toy bundles and for real (latent) models.
DEFAULT_SCORERS: dict[str, dict[str, tuple[str, ...]]] = {
    "toy": {"harmful": ("toy-harm",), "benign": ("toy-harm", "toy-prompt-accuracy", "toy-frechet")},
    "paper": {"harmful": ("nudenet",), "benign": ("nudenet",)},
}


#: Scorers of the paper's Tab. 1 that need local weights (US, FID, CLIP score; Sec. 4.1, App. B.3):
#: with the paper preset they join the default scorers when one of these options of theirs is given.
PAPER_WEIGHTED_SCORERS: dict[str, tuple[str, ...]] = {
    "unsafe-score": ("model", "heads"),
    "frechet": ("weights", "feature_model"),
    "clip-score": ("model",),
}


def default_scorers(preset: str, role: str, scorer_options: Mapping[str, Any] | None = None) -> list[str]:
    """The scorers of a set when none is named: the preset's, plus (paper) the weighted ones configured."""
    names = list(DEFAULT_SCORERS[preset][role])
    if preset == "paper":
        opts = scorer_options or {}
        names += [n for n, keys in PAPER_WEIGHTED_SCORERS.items()
                  if n not in names and any(k in (opts.get(n) or {}) for k in keys)]
    return names


def preset_name(bundle: Any) -> str:
    return "toy" if getattr(bundle, "kind", "") == "toy" else "paper"


# --------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    bundle: Any
    label: str  # how reports name it
    path: str | None  # the diffusers folder it came from (None: the shipped toy model)
    loader: str


def model_folder(spec: str | Path | None) -> Path | None:
    """The diffusers folder behind ``spec``: a run directory's ``model/``, or the folder itself.

    None (or ``"toy"``) stands for the shipped toy model. Anything else that is neither raises
    :class:`ModelLoadError` naming the path, before any work starts.
    """
    if spec is None or str(spec) == "toy":
        return None
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"model or run directory {str(path)!r} does not exist")
    if (path / "model" / "unet").is_dir():
        return path / "model"
    if (path / "unet").is_dir():
        return path
    raise ModelLoadError(
        f"{str(path)!r} is neither a diffusers model folder (with unet/) nor a run directory (with model/unet/)"
    )


def load_model(spec: str | Path | None, *, device: str = "cpu", dtype: str = "fp32") -> LoadedModel:
    """Load a model folder, a run directory's model or (None) the shipped toy model, with its loader."""
    from resalign.registry import get_registry

    folder = model_folder(spec)
    reg = get_registry()
    loaders = [i for i in reg.infos("model")]
    # The most specific loader first: any that claims the folder before the generic diffusers one.
    loaders.sort(key=lambda i: i.name == "diffusers")
    arg = None if folder is None else str(folder)
    for info in loaders:
        loader = reg.create("model", info.name)
        if loader.can_load(arg):
            bundle = loader.load(arg, device=device, dtype=dtype)
            if folder is None:
                label = "toy-base"
            else:
                label = Path(spec).name if folder.name == "model" else folder.name
            return LoadedModel(bundle, label, arg, info.name)
    raise ModelLoadError(f"no model loader can load {arg or 'the default model'!r}")


# --------------------------------------------------------------------------- prompt sets


@dataclass
class EvalSet:
    """A named prompt set, its role and the scorers run on its images."""

    name: str
    prompts: PromptSet
    scorers: list[str]
    role: str = "harmful"

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"prompt set {self.name!r}: role {self.role!r}, expected one of {', '.join(ROLES)}")


def toy_prompt_sets(n: int = 100, seed: int = 0) -> dict[str, tuple[PromptSet, str]]:
    """The toy world's evaluation sets: explicit harmful, implicit harmful and benign prompts."""
    from resalign.data import toy

    return {
        "harmful": (PromptSet(toy.harmful_prompts(n, seed), source="toy:harmful"), "harmful"),
        "implicit": (PromptSet(toy.implicit_prompts(n, seed), source="toy:implicit"), "harmful"),
        "benign": (PromptSet(toy.preservation_prompts(n, seed + 1), source="toy:preservation"), "benign"),
    }


def build_sets(
    preset: str,
    *,
    prompts_file: str | Path | None = None,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    scorers: Sequence[str] | None = None,
    role: str = "harmful",
    toy_prompts: int | None = None,
    only: Sequence[str] | None = None,
    scorer_options: Mapping[str, Any] | None = None,
) -> list[EvalSet]:
    """The prompt sets of an evaluation: the file's prompts, or the toy world's sets.

    ``scorers`` (``--scorer``) replaces the default scorers of every set (:func:`default_scorers`,
    which reads ``scorer_options``); ``only`` keeps the named toy sets.
    """
    if prompts_file is not None:
        ps = read_prompts(prompts_file, categories=categories, limit=limit)
        names = list(scorers) if scorers else default_scorers(preset, role, scorer_options)
        return [EvalSet(Path(prompts_file).stem, ps, names, role)]
    if preset != "toy":
        raise ConfigError("--prompts FILE is required for a model outside the toy world (e.g. an I2P CSV)")
    if categories:
        raise ConfigError("--category filters a CSV prompt file's 'categories' column: pass --prompts FILE")
    n = toy_prompts or GENERATION_PRESETS["toy"].prompts_per_set
    out = []
    for name, (ps, set_role) in toy_prompt_sets(n).items():
        if only and name not in only:
            continue
        if limit is not None:
            ps = ps.subset(range(min(limit, len(ps))))
        names = list(scorers) if scorers else list(DEFAULT_SCORERS["toy"][set_role])
        out.append(EvalSet(name, ps, names, set_role))
    if only:
        unknown = sorted(set(only) - {s.name for s in out})
        if unknown:
            raise ConfigError(f"unknown toy prompt set(s) {', '.join(unknown)}; expected harmful, implicit, benign")
    return out


def harmful_and_benign_sets(
    preset: str,
    *,
    prompts: str | Path | None,
    benign_prompts: str | Path | None,
    categories: Sequence[str] | None,
    limit: int | None,
    scorers: Sequence[str] | None,
    toy_prompts: int | None,
) -> tuple[list[EvalSet], list[EvalSet]]:
    """The harmful sets (``--prompts``, or the toy harmful and implicit sets) and the benign ones
    (``--benign-prompts``, or the toy benign set when the toy sets are used) of attack and compare."""
    harm = build_sets(preset, prompts_file=prompts, categories=categories, limit=limit, scorers=scorers,
                      toy_prompts=toy_prompts, only=None if prompts else ("harmful", "implicit"))
    benign: list[EvalSet] = []
    if benign_prompts:
        benign = build_sets(preset, prompts_file=benign_prompts, limit=limit, role="benign", scorers=scorers)
    elif preset == "toy" and not prompts:
        benign = build_sets("toy", toy_prompts=toy_prompts, only=("benign",), limit=limit, scorers=scorers)
    return harm, benign


# --------------------------------------------------------------------------- progress


class Bars:
    """Rich progress bars for long work (a no-op when disabled, e.g. in tests or ``--quiet``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> Bars:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def task(self, description: str, total: int, *, keep: bool = False) -> Callable[..., None]:
        """A callback ``update(done, total=None, description=None)`` for a new bar.

        The bar disappears once complete unless ``keep`` (the outer loops keep theirs).
        """
        if self._progress is None:
            return lambda *a, **k: None
        prog = self._progress
        tid = prog.add_task(description, total=total)
        state = {"total": total, "open": True}

        def update(done: int, total: int | None = None, description: str | None = None) -> None:
            if not state["open"]:
                return
            state["total"] = total if total is not None else state["total"]
            prog.update(tid, completed=done, total=state["total"], **({"description": description} if description else {}))
            if not keep and done >= state["total"]:
                prog.remove_task(tid)
                state["open"] = False

        return update

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, highlight=False)


# --------------------------------------------------------------------------- the evaluator


@dataclass
class Figure:
    """One scorer's figure on one prompt set's images."""

    prompts: str
    metric: str
    scorer: str
    value: float
    result: ScoreResult


@dataclass
class Generation:
    """How images are drawn: per image ``images_per_prompt``, DDIM ``steps``, CFG ``guidance``."""

    images_per_prompt: int
    steps: int
    guidance: float
    batch_size: int = 64

    def validate(self) -> Generation:
        if self.images_per_prompt < 1:
            raise ConfigError(f"--images-per-prompt must be >= 1, got {self.images_per_prompt}")
        if self.steps < 1:
            raise ConfigError(f"--sample-steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self


def resolve_generation(preset: str, images_per_prompt=None, steps=None, guidance=None, batch_size=64) -> Generation:
    p = GENERATION_PRESETS[preset]
    return Generation(
        images_per_prompt if images_per_prompt is not None else p.images_per_prompt,
        steps if steps is not None else p.steps,
        guidance if guidance is not None else p.guidance,
        batch_size,
    ).validate()


class Evaluator:
    """Generates each set's images at given UNet parameters and scores them.

    Scorers are built when the evaluator is (so a missing weights file fails before any generation),
    and reused for every evaluation.
    """

    def __init__(
        self,
        bundle: Any,
        sets: Sequence[EvalSet],
        generation: Generation,
        *,
        scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        if not sets:
            raise ConfigError("no prompt sets to evaluate")
        self.bundle = bundle
        self.sets = list(sets)
        self.generation = generation.validate()
        options = dict(scorer_options or {})
        check_scorer_options(options, self.sets)
        self.scorers = {n: create_scorer(n, options.get(n)) for s in self.sets for n in s.scorers}
        for scorer in self.scorers.values():
            warm_up(scorer, bundle.image_size)

    @property
    def images_per_evaluation(self) -> int:
        return sum(len(s.prompts) for s in self.sets) * self.generation.images_per_prompt

    def describe(self) -> dict[str, Any]:
        """The evaluation's settings, for ``report.json``."""
        return {
            "generation": dataclasses.asdict(self.generation),
            "sets": [
                {
                    "name": s.name,
                    "role": s.role,
                    "source": s.prompts.source,
                    "prompts": len(s.prompts),
                    "images": len(s.prompts) * self.generation.images_per_prompt,
                    "scorers": s.scorers,
                    "per_prompt_seeds": s.prompts.seeds is not None,
                    "per_prompt_guidance": s.prompts.guidance is not None,
                }
                for s in self.sets
            ],
            "scorers": {
                n: {"metric": scorer_metric(sc), **_config_of(sc), **_definition_of(sc)}
                for n, sc in self.scorers.items()
            },
        }

    def generate(self, s: EvalSet, *, bundle=None, params=None, seed: int = 0, progress=None) -> np.ndarray:
        from resalign.eval.generate import generate

        ps = s.prompts
        seeds: int | list[int] = seed if ps.seeds is None else [x + seed for x in ps.seeds]
        guidance = self.generation.guidance if ps.guidance is None else ps.guidance
        return generate(
            bundle if bundle is not None else self.bundle,
            ps.prompts,
            images_per_prompt=self.generation.images_per_prompt,
            steps=self.generation.steps,
            guidance=guidance,
            seed=seeds,
            batch_size=self.generation.batch_size,
            unet_params=params,
            progress=progress,
            distribute=True,
        )

    def evaluate(
        self,
        *,
        bundle: Any = None,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        bars: Bars | None = None,
        label: str = "",
        keep_images: bool = False,
    ) -> tuple[list[Figure], dict[str, np.ndarray]]:
        """Every set's figures at ``params`` (None: the UNet's own weights), and its images if asked.

        ``bundle`` evaluates another model of the same family with the same scorers (default: the
        evaluator's own). Under ``torchrun`` every rank calls it, shares the generation and gets the
        figures (scoring has no collectives, so a caller may use them on any rank).
        """
        figures: list[Figure] = []
        images_out: dict[str, np.ndarray] = {}
        for s in self.sets:
            total = len(s.prompts) * self.generation.images_per_prompt
            update = bars.task(f"{label}{s.name}: generating", total) if bars else None
            images = self.generate(s, bundle=bundle, params=params, seed=seed, progress=update)
            prompts = [p for p in s.prompts.prompts for _ in range(self.generation.images_per_prompt)]
            for name in s.scorers:
                result = self.scorers[name].score(images, prompts)
                figures.append(Figure(s.name, result.metric, name, float(result.value), result))
            if keep_images:
                images_out[s.name] = images
        return figures, images_out


def options_for(options: Mapping[str, Mapping[str, Any]], sets: Sequence[EvalSet]) -> dict[str, Any]:
    """The ``--scorer-option`` entries of the scorers that ``sets`` use."""
    names = {n for s in sets for n in s.scorers}
    return {k: dict(v) for k, v in options.items() if k in names}


def check_scorer_options(options: Mapping[str, Any], sets: Sequence[EvalSet]) -> None:
    """An option for a scorer no set uses is a mistake (a typo in the scorer's name): say so."""
    unknown = sorted(set(options) - {n for s in sets for n in s.scorers})
    if unknown:
        used = sorted({n for s in sets for n in s.scorers})
        raise ConfigError(f"--scorer-option for {', '.join(unknown)}: that scorer is not used "
                          f"(scorers in use: {', '.join(used)})")


def _definition_of(scorer: Any) -> dict[str, Any]:
    """A scorer's ``details()`` (labels, thresholds, file checksums, versions), when it has them."""
    details = getattr(scorer, "details", None)
    return {"details": details()} if callable(details) else {}


def _config_of(component: Any) -> dict[str, Any]:
    cfg = getattr(component, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        return {k: v for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, (bytes, bytearray))}
    return {}


# --------------------------------------------------------------------------- resalign eval


@dataclass
class EvalConfig:
    """Settings of ``resalign eval`` (None: the preset's value)."""

    model: str | None = None
    prompts: str | None = None
    scorers: list[str] = field(default_factory=list)
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    category: list[str] = field(default_factory=list)
    limit: int | None = None
    images_per_prompt: int | None = None
    sample_steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    seeds: int = 1
    batch_size: int = 64
    toy_prompts: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    save_images: bool = True
    threads: int | None = 1
    #: generation settings and default scorers: toy | paper (None: toy for a toy model, else paper)
    preset: str | None = None


def check_common(*, device: str, dtype: str, threads: int | None, seed: int, limit: int | None,
                 images_per_prompt: int | None, steps: int | None, guidance: float | None, toy_prompts: int | None,
                 scorers: Sequence[str] = (), prompt_files: Sequence[tuple[str, str | None]] = (),
                 categories: Sequence[str] | None = None, steps_flag: str = "--sample-steps") -> None:
    """The settings eval, attack and compare share, checked before any model is loaded.

    ``prompt_files`` are ``(flag, path)`` pairs; each file is read once here, so a missing, binary or
    malformed file fails now, naming the file.
    """
    from resalign.registry import get_registry
    from resalign.validation import check_device, check_dtype, check_int, check_number, check_seed

    check_device(device, "--device")
    check_dtype(dtype, device, "--dtype", fp16_needs_cuda=False)
    check_int(threads, "--threads", ge=0, optional=True)
    check_seed(seed, "--seed")
    check_int(limit, "--limit", ge=1, optional=True)
    check_int(images_per_prompt, "--images-per-prompt", ge=1, optional=True)
    check_int(steps, steps_flag, ge=1, optional=True)
    check_number(guidance, "--guidance", ge=0, optional=True)
    check_int(toy_prompts, "--toy-prompts", ge=1, optional=True)
    reg = get_registry()
    for name in scorers:
        reg.info("scorer", name)
    for i, (flag, path) in enumerate(prompt_files):
        if path is not None:
            read_prompts(path, categories=categories if i == 0 else None)


def check_eval_config(cfg: EvalConfig) -> None:
    """Every setting of ``resalign eval`` that can be checked without the model."""
    from resalign.validation import check_int

    check_int(cfg.seeds, "--seeds", ge=1)
    check_int(cfg.batch_size, "--batch-size", ge=1)
    check_common(device=cfg.device, dtype=cfg.dtype, threads=cfg.threads, seed=cfg.seed, limit=cfg.limit,
                 images_per_prompt=cfg.images_per_prompt, steps=cfg.sample_steps, guidance=cfg.guidance,
                 toy_prompts=cfg.toy_prompts, scorers=cfg.scorers, prompt_files=[("--prompts", cfg.prompts)],
                 categories=cfg.category, steps_flag="--sample-steps")
    if cfg.category and not cfg.prompts:
        raise ConfigError("--category filters a CSV prompt file's 'categories' column: pass --prompts FILE")
    if cfg.preset is not None and cfg.preset not in GENERATION_PRESETS:
        raise ConfigError(f"--preset {cfg.preset!r}: expected one of {', '.join(GENERATION_PRESETS)}")
    model_folder(cfg.model)


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads (1 by default: on shared cores more threads are slower, see NOTES)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def add_figures(report: TidyReport, per_seed: Sequence[Sequence[Figure]], **keys: Any) -> None:
    """One report row per (prompt set, metric, scorer), its values over seeds."""
    order: dict[tuple[str, str, str], list[float]] = {}
    for figs in per_seed:
        for f in figs:
            order.setdefault((f.prompts, f.metric, f.scorer), []).append(f.value)
    for (prompts, metric, scorer), values in order.items():
        report.add(values, prompts=prompts, metric=metric, scorer=scorer, **keys)


def run_eval(cfg: EvalConfig, out: str | Path, *, progress: bool = True) -> tuple[Path, TidyReport]:
    """``resalign eval``: load, generate per set and seed, score, write the run directory."""
    from resalign.config import to_dict
    from resalign.eval.plots import save_grid
    from resalign.rundir import RunDir

    check_eval_config(cfg)
    distributed.init(cfg.device)
    set_threads(cfg.threads)
    model = load_model(cfg.model, device=distributed.local_device(cfg.device), dtype=cfg.dtype)
    preset = cfg.preset or preset_name(model.bundle)
    sets = build_sets(
        preset,
        prompts_file=cfg.prompts,
        categories=cfg.category,
        limit=cfg.limit,
        scorers=cfg.scorers,
        toy_prompts=cfg.toy_prompts,
        scorer_options=cfg.scorer_options,
    )
    gen = resolve_generation(preset, cfg.images_per_prompt, cfg.sample_steps, cfg.guidance, cfg.batch_size)
    evaluator = Evaluator(model.bundle, sets, gen, scorer_options=cfg.scorer_options)
    seeds = [cfg.seed + k * SEED_STRIDE for k in range(cfg.seeds)]

    def open_run_dir() -> RunDir:
        run = RunDir(out, command="eval")
        run.write_config({"command": "eval", **to_dict(cfg), "preset": preset, "seeds_used": seeds})
        return run

    run = distributed.on_main(open_run_dir)
    report = TidyReport("eval")
    report.settings.update(
        model=model.label, model_path=model.path, loader=model.loader, preset=preset, seeds=seeds,
        evaluation=evaluator.describe(), config=to_dict(cfg),
    )
    started = time.perf_counter()
    per_seed: list[list[Figure]] = []
    grid: dict[str, np.ndarray] = {}
    with Bars(progress and run is not None) as bars:
        for k, seed in enumerate(seeds):
            figs, images = evaluator.evaluate(
                seed=seed, bars=bars, label=f"seed {seed}: " if len(seeds) > 1 else "", keep_images=True
            )
            if run is None:
                continue
            per_seed.append(figs)
            for s in sets:
                if k == 0:
                    grid[s.name] = images[s.name][:8]
                if cfg.save_images:
                    _save_set(run.path / "images" / s.name / (f"seed{seed}" if len(seeds) > 1 else ""),
                              images[s.name], s, gen, [f for f in figs if f.prompts == s.name])
    if run is None:
        return Path(out), report
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    add_figures(report, per_seed, model=model.label, stage="before_ft")

    figures = []
    if grid:
        save_grid(grid, run.path / "samples.png", title=f"{model.label}: first images of each prompt set")
        figures.append(("Sample images (first of each prompt set)", "samples.png"))
    tables = [eval_table(report, f"{model.label}: figures by prompt set")]
    report.write(run.path, title=f"resalign eval: {model.label}", tables=tables, figures=figures)
    return run.path, report


def _save_set(folder: Path, images: np.ndarray, s: EvalSet, gen: Generation, figs: Sequence[Figure]) -> None:
    """The images of one set as an image-caption folder, with per-image scores next to them."""
    from resalign.data.folders import write_folder

    prompts = [p for p in s.prompts.prompts for _ in range(gen.images_per_prompt)]
    write_folder(folder, images, prompts)
    files = sorted(p.name for p in folder.glob("*.png"))
    for f in figs:
        if f.result.per_image:
            sub = folder / "scores" / f.scorer
            write_per_image(sub, files, f.result)


def eval_table(report: TidyReport, title: str) -> MarkdownTable:
    """Rows = prompt sets, columns = metric (scorer), cells mean ± SEM over seeds."""
    return report.pivot("prompts", lambda r: f"{r['metric']} ({r['scorer']})", title=title, corner="prompts")


# --------------------------------------------------------------------------- resalign score


@dataclass
class ScoreConfig:
    images: str
    scorer: str
    scorer_options: dict[str, Any] = field(default_factory=dict)
    #: refuse a folder with an unreadable image file (default: list such files, skip them, score the rest)
    strict_images: bool = False


def _warn(message: str) -> None:
    from rich.console import Console

    from rich.markup import escape

    Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def run_score(cfg: ScoreConfig, out: str | Path, *, warn: Callable[[str], None] | None = None) -> tuple[Path, TidyReport]:
    """``resalign score``: score a folder of existing images; per-image files and the report.

    Files with an image suffix that do not decode are listed through ``warn`` and skipped (recorded
    as ``skipped_images`` in the report), or refused with ``cfg.strict_images``.
    """
    from resalign.config import to_dict
    from resalign.errors import DataError
    from resalign.eval.plots import save_grid
    from resalign.eval.scoring import is_detector, list_images, readable_images, score_folder
    from resalign.eval.stats import rate_stats
    from resalign.rundir import RunDir

    from resalign.registry import get_registry

    get_registry().info("scorer", cfg.scorer)
    files = list_images(cfg.images)  # a missing or empty folder fails before the scorer loads its weights
    files, bad = readable_images(files)
    root = Path(cfg.images)
    skipped = [f.relative_to(root).as_posix() for f, _ in bad]
    if bad and cfg.strict_images:
        raise DataError(f"--strict-images: {str(bad[0][0])!r} is not a readable image ({bad[0][1]})"
                        + (f"; {len(bad) - 1} more unreadable file(s)" if len(bad) > 1 else ""))
    if not files:
        raise DataError(f"image folder {str(cfg.images)!r}: none of its {len(bad)} image file(s) can be read "
                        f"(first: {skipped[0]!r}: {bad[0][1]})")
    if bad:
        (warn or _warn)(f"skipping {len(bad)} unreadable image file(s) in {str(cfg.images)!r}: "
                        + ", ".join(skipped[:20]) + (", ..." if len(skipped) > 20 else "")
                        + " (--strict-images refuses them instead)")
    scorer = create_scorer(cfg.scorer, cfg.scorer_options)
    warm_up(scorer, _image_side(files[0]))
    run = RunDir(out, command="score")
    run.write_config({"command": "score", **to_dict(cfg)})
    started = time.perf_counter()
    scored = score_folder(cfg.images, scorer, files)
    per_image = write_per_image(run.path, scored.files, scored.result)
    report = TidyReport("score")
    report.settings.update(
        images=str(cfg.images), n_images=len(scored.files), scorer=cfg.scorer, by_path=scored.by_path,
        scorer_config=_config_of(scorer), details=scored.result.details,
        seconds=round(time.perf_counter() - started, 2), skipped_images=skipped,
    )
    row = report.add(scored.result.value, dataset=Path(cfg.images).name, metric=scored.result.metric, scorer=cfg.scorer)
    intro = f"{len(scored.files)} images in `{cfg.images}` scored with `{cfg.scorer}`."
    if skipped:
        intro += (f" {len(skipped)} unreadable file(s) skipped: " + ", ".join(f"`{s}`" for s in skipped[:20])
                  + (", ..." if len(skipped) > 20 else "") + ".")
    figures = []
    flags = _flags(scored.result)
    if flags is not None:
        st = rate_stats(flags)
        row.update(images=st.n, flagged=st.k, image_sem=st.sem, ci95=[st.ci_low, st.ci_high])
        intro += (f" {st.k} of {st.n} flagged: rate {st.rate:.4f} ± {st.sem:.4f} (SEM over images), "
                  f"95% bootstrap interval [{st.ci_low:.4f}, {st.ci_high:.4f}].")
        save_grid(_grid_rows(Path(cfg.images), scored.files, flags), run.path / "samples.png",
                  title=f"{Path(cfg.images).name}: {cfg.scorer}")
        figures.append(("Scored images: the first flagged and not flagged ones", "samples.png"))
    if per_image is not None:
        intro += f" Per-image results: `{per_image.name}`" + (" (detections)." if is_detector(scored.result) else ".")
    report.write(run.path, title=f"resalign score: {Path(cfg.images).name}", intro=intro, figures=figures)
    return run.path, report


def _grid_rows(folder: Path, files: Sequence[str], flags: Sequence[bool], n: int = 8) -> dict[str, list[np.ndarray]]:
    """Up to ``n`` flagged and ``n`` not flagged images, as thumbnails of at most 128 px."""
    from PIL import Image

    rows: dict[str, list[np.ndarray]] = {"flagged": [], "not flagged": []}
    for f, flagged in zip(files, flags):
        row = rows["flagged" if flagged else "not flagged"]
        if len(row) < n:
            with Image.open(folder / f) as im:
                im = im.convert("RGB")
                im.thumbnail((128, 128))
                row.append(np.asarray(im))
    return {k: v for k, v in rows.items() if v}


def _image_side(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return min(im.size)


def _flags(result: ScoreResult) -> list[bool] | None:
    """Per-image binary outcomes of a rate scorer, when its rows carry them."""
    rows = result.per_image or []
    for key in ("flagged", "harmful", "unsafe", "match"):
        if rows and all(isinstance(r.get(key), bool) for r in rows):
            return [r[key] for r in rows]
    return None

