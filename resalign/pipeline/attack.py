"""``resalign attack``: fine-tune a released model the way a downstream user would, and watch its harm.

This is the paper's central measurement (Sec. 4.1 "Implementation Details", Sec. 4.2, App. B.4): an
unlearned model is fine-tuned (full, LoRA, SVDiff, CustomDiffusion, DreamBooth; batch 1, AdamW,
diffusers defaults) and its harmful rate is measured before and along the fine-tuning (Fig. 2),
repeated over independent seeds and reported as mean ± SEM. The paper's stress tests are options:
``--contaminate R --harmful-data DIR`` (Fig. 4, App. B.2), ``--escape p=2,lambda=0.5`` (App. C.1,
Tab. 11) and ``--progressive`` (App. C.1, Fig. 7).

The plan (presets ``sd`` (``paper``) and ``toy``, data, stages) is :mod:`resalign.eval.protocol.attack`'s; the preset
follows the model unless ``--preset`` names one. ``--sweep`` attacks with every trial of a search space
instead and reports the worst case within a utility budget (:mod:`resalign.eval.protocol.sweep`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resalign import distributed
from resalign.cells import Cell, Outcome, Sweep
from resalign.eval.protocol.attack import check_data_spec, parse_escape, plan_attack, with_personalization_reference
from resalign.eval.scoring.evaluator import Evaluator, resolve_generation
from resalign.eval.protocol.finetune import Finetuner, FinetuneSpec, adapter_class
from resalign.eval.protocol.sweep_runs import SweepSettings, attack_sweep
from resalign.eval.scoring.presets import SEED_STRIDE, preset_name
from resalign.settings.presets import preset_named
from resalign.eval.reports.tidy import MarkdownTable, TidyReport
from resalign.eval.scoring.sets import EvaluationSettings, check_scorer_options, harmful_and_benign_sets, options_for
from resalign.models.load import load_model, model_folder
from resalign.pipeline.evaluate import check_common, set_threads
from resalign.progress import Bars
from resalign.eval.reports.records import add_figures, attack_records, figures_value, samples_arrays


@dataclass
class AttackConfig(EvaluationSettings, SweepSettings):
    """Settings of ``resalign attack`` (None: the preset's value); the evaluation's are
    :class:`~resalign.eval.scoring.sets.EvaluationSettings`, ``--sweep``'s
    :class:`~resalign.eval.protocol.sweep.SweepSettings`."""

    model: str | None = None
    adapt: str = "full"
    data: list[str] = field(default_factory=list)
    ft_steps: int | None = None
    lr: float | None = None
    optimizer: str = "adamw"
    batch_size: int = 1
    seeds: int = 3
    seed: int = 0
    eval_every: int | None = None
    preset: str | None = None
    contaminate: float | None = None
    harmful_data: str | None = None
    escape: str | None = None
    progressive: bool = False
    gen_batch_size: int = 64
    lora_rank: int = 4
    prior_data: str | None = None
    class_prompt: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = 1


def check_attack_config(cfg: AttackConfig) -> None:
    """Every setting of ``resalign attack`` that can be checked without the model."""
    from resalign.validation import check_int, check_number

    adapter_class(cfg.adapt)
    if cfg.preset is not None:
        preset_named(cfg.preset)
    check_int(cfg.ft_steps, "--ft-steps", ge=0, optional=True)
    check_number(cfg.lr, "--lr", gt=0, optional=True)
    check_int(cfg.batch_size, "--batch-size", ge=1)
    check_int(cfg.gen_batch_size, "gen_batch_size", ge=1)
    check_int(cfg.seeds, "--seeds", ge=1)
    check_int(cfg.eval_every, "--eval-every", ge=0, optional=True)
    check_number(cfg.contaminate, "--contaminate", ge=0, le=1, optional=True)
    check_int(cfg.lora_rank, "--lora-rank", ge=1)
    parse_escape(cfg.escape)
    FinetuneSpec(adapt=cfg.adapt, steps=cfg.ft_steps or 0, lr=cfg.lr, optimizer=cfg.optimizer, batch_size=cfg.batch_size,
                 lora_rank=cfg.lora_rank).validate()
    check_common(device=cfg.device, dtype=cfg.dtype, threads=cfg.threads, seed=cfg.seed, limit=cfg.limit,
                 images_per_prompt=cfg.images_per_prompt, steps=cfg.sample_steps, guidance=cfg.guidance,
                 toy_prompts=cfg.toy_prompts, scorers=cfg.scorers,
                 prompt_files=[("--prompts", cfg.prompts), ("--benign-prompts", cfg.benign_prompts)],
                 categories=cfg.category)
    for spec in cfg.data:
        check_data_spec(spec, "--data")
    for flag, spec in (("--harmful-data", cfg.harmful_data), ("--prior-data", cfg.prior_data)):
        if spec:
            check_data_spec(spec, flag)
    model_folder(cfg.model)

def run_attack(cfg: AttackConfig, out: str | Path, *, progress: bool = True, resume: bool = False
               ) -> tuple[Path, TidyReport]:
    """``resalign attack``: fine-tune over seeds, evaluating along the way; write the run directory.

    Each seed is one cell of a :class:`~resalign.cells.Sweep`: recorded when finished, skipped with
    ``resume``, and under ``torchrun`` split over the ranks (rank 0 writes the merged report).
    """
    from resalign.config import to_dict
    from resalign.eval.reports.plots import plot_curves, save_grid

    check_attack_config(cfg)
    distributed.init(cfg.device)
    set_threads(cfg.threads)
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    preset = preset_name(model.bundle, cfg.preset)
    gen_preset = preset_name(model.bundle)
    plan = plan_attack(cfg, model.bundle, preset)
    curve_sets, utility_sets = harmful_and_benign_sets(
        gen_preset, prompts=cfg.prompts, benign_prompts=cfg.benign_prompts, categories=cfg.category,
        limit=cfg.limit, scorers=cfg.scorers, toy_prompts=cfg.toy_prompts, scorer_options=cfg.scorer_options,
    )
    gen = resolve_generation(gen_preset, cfg.images_per_prompt, cfg.sample_steps, cfg.guidance, cfg.gen_batch_size)
    check_scorer_options(cfg.scorer_options, curve_sets + utility_sets)
    swept = attack_sweep(cfg, preset_named(preset), model.bundle.image_size, utility_sets) if cfg.sweep else None
    # clip-i and dino compare with the personalization set: by default the --data folder
    scorer_options = with_personalization_reference(
        cfg.scorer_options, [n for s in curve_sets + utility_sets for n in s.scorers], cfg.data)
    curve_eval = Evaluator(model.bundle, curve_sets, gen, scorer_options=options_for(scorer_options, curve_sets))
    utility_eval = (
        Evaluator(model.bundle, utility_sets, gen, scorer_options=options_for(scorer_options, utility_sets))
        if utility_sets else None
    )
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    sweep = Sweep(out, command="attack", settings={**to_dict(cfg), "preset": preset}, resume=resume)
    run_path = sweep.path
    if sweep.run_dir is not None:
        sweep.run_dir.write_config({"command": "attack", **to_dict(cfg), "preset": preset, "seeds_used": seeds})

    report = TidyReport("attack")
    report.settings.update(
        model=model.label, model_path=model.path, preset=preset, seeds=seeds,
        finetune=dataclasses.asdict(plan.spec) | {"lr": plan.spec.resolved_lr()},
        dataset=plan.dataset, stages=[{"name": s.name, "steps": s.steps, "pairs": len(s.data.prompts)} for s in plan.stages],
        eval_every=plan.eval_every, notes=plan.notes,
        evaluation=curve_eval.describe(), utility=utility_eval.describe() if utility_eval else None,
        config=to_dict(cfg),
    )
    started = time.perf_counter()
    final_step = sum(st.steps for st in plan.stages)
    progress = progress and distributed.is_main()
    if swept is not None:  # --sweep: the model attacked with every trial instead of the one recipe
        with Bars(progress) as bars:
            swept(sweep, model.label, model.bundle, [e for e in (curve_eval, utility_eval) if e], curve_sets[0].name,
                  report, bars, started)
        return run_path, report

    with Bars(progress) as bars:
        runs = bars.task(f"attack {plan.spec.adapt} on {plan.dataset}: seeds", len(seeds), keep=True)
        done = [0]

        def attack_seed(cell: Cell) -> Outcome:
            """One fine-tuning run (one seed) with its evaluations along the way."""
            k, seed = cell.settings["k"], cell.settings["seed"]
            gen_seed, first = cfg.seed + k * SEED_STRIDE, k == 0
            curves: dict[str, list] = {}
            utility: dict[str, list] = {}
            samples: dict[str, np.ndarray] = {}
            ft = Finetuner(model.bundle, plan.spec, plan.stages, seed=seed, prior=plan.prior,
                           class_generation={"steps": gen.steps, "guidance": gen.guidance})
            steps_bar = bars.task(f"seed {seed}: fine-tuning", ft.total_steps)

            def on_eval(step: int, params) -> None:
                ends = step in (0, final_step)
                label = f"seed {seed} step {step}: "
                figs, imgs = curve_eval.evaluate(params=params, seed=gen_seed, bars=bars, label=label,
                                                 keep_images=first and ends)
                curves[str(step)] = figures_value(figs)
                if utility_eval is not None and ends:
                    ufigs, uimgs = utility_eval.evaluate(params=params, seed=gen_seed, bars=bars, label=label,
                                                         keep_images=first)
                    utility["before_ft" if step == 0 else "after_ft"] = figures_value(ufigs)
                    imgs.update(uimgs)
                tag = "before" if step == 0 else f"after {step} steps"
                samples.update({f"{name}, {tag}": im[:8] for name, im in imgs.items()})

            ft.run(eval_every=plan.eval_every, on_eval=on_eval,
                   progress=lambda s, t, loss: steps_bar(s, t, description=f"seed {seed}: fine-tuning (loss {loss:.3f})"))
            names, arrays = samples_arrays(samples)
            return Outcome({"curves": curves, "utility": utility, "samples": names}, arrays)

        def seed_done(_i: int, _outcome: Outcome) -> None:
            done[0] += 1
            runs(done[0])

        outcomes = sweep.run([Cell(f"seed-{seed}", {"k": k, "seed": seed}) for k, seed in enumerate(seeds)],
                             attack_seed, on_done=seed_done)
    curves, utility, samples = attack_records(outcomes)  # in seed order, as one process computes them
    report.settings["seconds"] = round(time.perf_counter() - started, 1)

    keys = dict(model=model.label, finetune=plan.spec.adapt, dataset=plan.dataset)
    for step in sorted(curves):
        add_figures(report, curves[step], stage="before_ft" if step == 0 else "after_ft", step=step, **keys)
    for stage, figs in utility.items():
        if figs:
            add_figures(report, figs, stage=stage, step=0 if stage == "before_ft" else final_step, **keys)

    if not distributed.is_main():  # rank 0 writes the merged report
        return run_path, report
    harm_rows = [r for r in report.results if r["metric"] == "harmful_rate" and r.get("prompts") in {s.name for s in curve_sets}]
    figures = []
    plot_curves(harm_rows, run_path / "harmful_rate_vs_step.png", label="prompts",
                title=f"{model.label}: {plan.spec.adapt} fine-tuning on {plan.dataset} (mean ± SEM, {len(seeds)} seeds)")
    figures.append(("Harmful rate vs fine-tuning step (mean ± SEM over seeds)", "harmful_rate_vs_step.png"))
    if samples:
        save_grid(samples, run_path / "samples.png", title=f"{model.label}, seed {seeds[0]}")
        figures.append(("Samples before and after fine-tuning (first seed)", "samples.png"))
    tables = [_curve_table(report, curve_sets)]
    if utility_eval is not None:
        tables.append(_utility_table(report, utility_sets))
    intro = (
        f"`{model.label}` fine-tuned with **{plan.spec.adapt}** on **{plan.dataset}** "
        f"({final_step} steps, lr {plan.spec.resolved_lr():g}, "
        f"{plan.spec.optimizer}, batch {plan.spec.batch_size}), {len(seeds)} seeds; preset `{preset}`."
        + ("".join(f"\n\n{n}." for n in plan.notes))
    )
    report.write(run_path, title=f"resalign attack: {model.label}", intro=intro, tables=tables, figures=figures)
    sweep.close()
    return run_path, report


def _curve_table(report: TidyReport, sets: Sequence[Any]) -> MarkdownTable:
    names = {s.name for s in sets}
    rows = [r for r in report.results if r.get("prompts") in names and r.get("step") is not None]
    sub = TidyReport(report.command, results=rows)
    return sub.pivot(lambda r: str(r["step"]), lambda r: f"{r['prompts']}: {r['metric']}",
                     title="Along fine-tuning (mean ± SEM over seeds)", corner="step")


def _utility_table(report: TidyReport, sets: Sequence[Any]) -> MarkdownTable:
    names = {s.name for s in sets}
    rows = [r for r in report.results if r.get("prompts") in names]
    sub = TidyReport(report.command, results=rows)
    return sub.pivot("stage", lambda r: f"{r['prompts']}: {r['metric']}",
                     title="Benign prompts before and after fine-tuning", corner="stage",
                     rows_order=["before_ft", "after_ft"])
