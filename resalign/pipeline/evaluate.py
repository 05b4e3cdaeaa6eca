"""``resalign eval`` and ``resalign score``: generate from prompt sets, score the images, write a report.

With no arguments, ``resalign eval`` evaluates the shipped toy base model on the toy world's prompt
sets: ``harmful`` (explicit), ``implicit`` (never naming the harmful concept, like I2P) and ``benign``
(:mod:`resalign.eval.scoring.sets`). The measurement is :class:`resalign.eval.scoring.evaluator.Evaluator`'s
(Sec. 4.1 "Evaluation Metrics", App. B.3); ``resalign score`` is :mod:`resalign.eval.scoring.score`'s.

Under ``torchrun`` the ranks share the generation (each rank the batches b ≡ rank mod world size,
images gathered on every rank), every rank scores the whole set, rank 0 alone writes; the report
equals the single-process one. Inside
:func:`resalign.distributed.solo` (a cell of ``attack`` / ``compare`` computed by one rank) an
evaluation runs whole in its process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resalign import distributed
from resalign.data.prompts import read_prompts
from resalign.errors import ConfigError
from resalign.eval.reports.records import Figure, add_figures
from resalign.eval.scoring.evaluator import Evaluator, config_of, resolve_generation, save_set
from resalign.eval.scoring.presets import SEED_STRIDE, preset_name
from resalign.settings.presets import preset_named
from resalign.eval.reports.tidy import MarkdownTable, TidyReport
from resalign.eval.scoring.run import create_scorer, warm_up, write_per_image
from resalign.eval.scoring.sets import build_sets
from resalign.models.load import load_model, model_folder
from resalign.progress import Bars

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
    if cfg.preset is not None:
        preset_named(cfg.preset)
    model_folder(cfg.model)


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads (1 by default: on shared cores more threads are slower, see NOTES)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def run_eval(cfg: EvalConfig, out: str | Path, *, progress: bool = True) -> tuple[Path, TidyReport]:
    """``resalign eval``: load, generate per set and seed, score, write the run directory."""
    from resalign.config import to_dict
    from resalign.eval.reports.plots import save_grid
    from resalign.rundir import RunDir

    check_eval_config(cfg)
    distributed.init(cfg.device)
    set_threads(cfg.threads)
    model = load_model(cfg.model, device=distributed.local_device(cfg.device), dtype=cfg.dtype)
    preset = preset_name(model.bundle, cfg.preset)
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
                    save_set(run.path / "images" / s.name / (f"seed{seed}" if len(seeds) > 1 else ""),
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
    from resalign.eval.reports.plots import save_grid
    from resalign.eval.scoring.score import grid_rows, image_side, listing, rate_summary, screen_images
    from resalign.eval.scoring.run import is_detector, score_folder
    from resalign.registry import get_registry
    from resalign.rundir import RunDir

    get_registry().info("scorer", cfg.scorer)
    files, skipped = screen_images(cfg.images, strict=cfg.strict_images, warn=warn or _warn)
    scorer = create_scorer(cfg.scorer, cfg.scorer_options)
    warm_up(scorer, image_side(files[0]))
    run = RunDir(out, command="score")
    run.write_config({"command": "score", **to_dict(cfg)})
    started = time.perf_counter()
    scored = score_folder(cfg.images, scorer, files)
    per_image = write_per_image(run.path, scored.files, scored.result)
    report = TidyReport("score")
    report.settings.update(
        images=str(cfg.images), n_images=len(scored.files), scorer=cfg.scorer, by_path=scored.by_path,
        scorer_config=config_of(scorer), details=scored.result.details,
        seconds=round(time.perf_counter() - started, 2), skipped_images=skipped,
    )
    row = report.add(scored.result.value, dataset=Path(cfg.images).name, metric=scored.result.metric, scorer=cfg.scorer)
    intro = f"{len(scored.files)} images in `{cfg.images}` scored with `{cfg.scorer}`."
    if skipped:
        intro += f" {len(skipped)} unreadable file(s) skipped: " + listing(skipped, "`") + "."
    figures = []
    flags, summary = rate_summary(scored.result, row)
    intro += summary
    if flags is not None:
        save_grid(grid_rows(Path(cfg.images), scored.files, flags), run.path / "samples.png",
                  title=f"{Path(cfg.images).name}: {cfg.scorer}")
        figures.append(("Scored images: the first flagged and not flagged ones", "samples.png"))
    if per_image is not None:
        intro += f" Per-image results: `{per_image.name}`" + (" (detections)." if is_detector(scored.result) else ".")
    report.write(run.path, title=f"resalign score: {Path(cfg.images).name}", intro=intro, figures=figures)
    return run.path, report
