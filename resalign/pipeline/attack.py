"""``resalign attack``: fine-tune a released model the way a downstream user would, and watch its harm.

This is the paper's central measurement (Sec. 4.1 "Implementation Details", Sec. 4.2, App. B.4): an
unlearned model is fine-tuned (full, LoRA, SVDiff, CustomDiffusion, DreamBooth; batch 1, AdamW,
diffusers defaults) and its harmful rate is measured before and along the fine-tuning (Fig. 2),
repeated over independent seeds and reported as mean ± SEM. The paper's stress tests are options:

* ``--contaminate R --harmful-data DIR``: a share R of the fine-tuning pairs replaced by harmful ones
  (Fig. 4, App. B.2);
* ``--escape p=2,lambda=0.5``: L_FT(θ') − λ‖θ' − θ‖_p, pushing the weights away from the released
  ones (App. C.1, Tab. 11);
* ``--progressive``: the steps split into four equal stages — benign, benign (a second ``--data`` if
  given), the less harmful half of the harmful data (ranked by the harm scorer), all harmful data
  (App. C.1, Fig. 7).

Presets: ``paper`` is App. B.4 (200 steps, lr 1e-5 for full fine-tuning, the reference scripts' lr for
the other methods, evaluation every 50 steps). ``toy`` keeps the protocol and scales the learning
rates to the toy model: the evaluation lr of SD v1.4 is a tenth of its pretraining lr (1e-5 vs 1e-4),
and the toy model was pretrained at 1e-3, so its evaluation lr is 1e-4 (and likewise ×10 for each
method). The preset follows the model unless ``--preset`` names one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resalign import distributed
from resalign.cells import Cell, Outcome, Sweep
from resalign.errors import ConfigError, DataError
from resalign.eval.report import MarkdownTable, TidyReport
from resalign.pipeline.evaluate import (
    SEED_STRIDE,
    Bars,
    Evaluator,
    Figure,
    add_figures,
    check_scorer_options,
    harmful_and_benign_sets,
    load_model,
    options_for,
    preset_name,
    resolve_generation,
    set_threads,
)
from resalign.eval.finetune import Finetuner, FinetuneSpec, Stage, adapter_class, reference_lr, uses_prior
from resalign.eval.pairs import Pairs, contaminate
from resalign.pipeline.records import (
    figures_of,
    figures_value,
    samples_arrays,
    samples_of,
)


@dataclass(frozen=True)
class AttackPreset:
    """Fine-tuning defaults of a preset: steps, evaluation interval, learning-rate scale, set size."""

    steps: int
    eval_every: int
    lr_scale: float = 1.0  # times each method's reference learning rate (its adapter's paper_lr)
    toy_data_size: int = 100

    def lr_for(self, adapt: str) -> float:
        return self.lr_scale * reference_lr(adapt)


ATTACK_PRESETS: dict[str, AttackPreset] = {
    "paper": AttackPreset(steps=200, eval_every=50),
    "toy": AttackPreset(steps=200, eval_every=50, lr_scale=10.0),
}

#: Toy image-caption sets ``--data`` may name (``toy-images:NAME``) instead of a folder, and the seed each
#: is drawn with (the toy generators' own defaults), so a name means the same pairs everywhere.
TOY_DATA_PREFIX = "toy-images:"
TOY_DATA_SEEDS = {"benign-a": 1, "benign-b": 2, "contamination": 3, "harmful": 3}


def parse_escape(text: str | None) -> tuple[int, float] | None:
    """``"p=2,lambda=0.5"`` -> (2, 0.5); the paper's setting is p in {1, 2}, λ = 0.5 (Tab. 11)."""
    if not text:
        return None
    p, lam = None, 0.5
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ConfigError(f"--escape {text!r}: expected p=1|2,lambda=VALUE")
        try:
            if key == "p":
                p = int(value)
            elif key in ("lambda", "lam", "λ"):
                lam = float(value)
            else:
                raise ConfigError(f"--escape {text!r}: unknown key {key!r} (expected p and lambda)")
        except ValueError:
            raise ConfigError(f"--escape {text!r}: {key + '=' + value.strip()!r} is not a number") from None
    if p not in (1, 2):
        raise ConfigError(f"--escape {text!r}: p must be 1 or 2")
    if not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"--escape {text!r}: lambda must be a finite number >= 0, got {lam!r}")
    return p, lam


def load_pairs(spec: str, *, size: int, toy_size: int = 100, seed: int = 0) -> Pairs:
    """An image-caption folder, or a toy set ``toy-images:benign-a|benign-b|contamination|harmful|world``."""
    if spec.startswith(TOY_DATA_PREFIX):
        from resalign.data.toy import IMAGE_SETS

        name = spec[len(TOY_DATA_PREFIX) :]
        if name not in IMAGE_SETS:
            raise ConfigError(f"--data {spec!r}: unknown toy set; expected one of "
                              + ", ".join(TOY_DATA_PREFIX + n for n in IMAGE_SETS))
        ds = IMAGE_SETS[name](toy_size, TOY_DATA_SEEDS.get(name, 0))
        return Pairs(ds.images, list(ds.prompts), name)
    from resalign.data.folders import read_folder

    path = Path(spec)
    if not path.is_dir():
        raise DataError(f"fine-tuning data {spec!r}: no such folder (or name a toy set as toy-images:benign-a)")
    folder = read_folder(path, size=size)
    return Pairs(folder.images, folder.prompts, path.name)


@dataclass
class AttackConfig:
    """Settings of ``resalign attack`` (None: the preset's value)."""

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
    prompts: str | None = None
    benign_prompts: str | None = None
    category: list[str] = field(default_factory=list)
    limit: int | None = None
    scorers: list[str] = field(default_factory=list)
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    images_per_prompt: int | None = None
    sample_steps: int | None = None
    guidance: float | None = None
    gen_batch_size: int = 64
    toy_prompts: int | None = None
    lora_rank: int = 4
    prior_data: str | None = None
    class_prompt: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = 1


@dataclass
class Plan:
    """Everything an attack needs, resolved and validated before any fine-tuning starts."""

    spec: FinetuneSpec
    stages: list[Stage]
    eval_every: int
    dataset: str
    prior: Pairs | None
    notes: list[str]


def plan_attack(cfg: AttackConfig, bundle: Any, preset: str) -> Plan:
    """Resolve data, schedule and fine-tuning spec; every input error surfaces here."""
    adapter_class(cfg.adapt)
    if cfg.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {cfg.seeds}")
    p = ATTACK_PRESETS[preset]
    steps = cfg.ft_steps if cfg.ft_steps is not None else p.steps
    eval_every = cfg.eval_every if cfg.eval_every is not None else p.eval_every
    if eval_every < 0:
        raise ConfigError(f"--eval-every must be >= 0, got {eval_every}")
    escape = parse_escape(cfg.escape)
    spec = FinetuneSpec(
        adapt=cfg.adapt,
        steps=steps,
        lr=cfg.lr if cfg.lr is not None else p.lr_for(cfg.adapt),
        optimizer=cfg.optimizer,
        batch_size=cfg.batch_size,
        lora_rank=cfg.lora_rank,
        class_prompt=cfg.class_prompt,
        escape_p=escape[0] if escape else None,
        escape_lambda=escape[1] if escape else 0.5,
    ).validate()
    data_specs = list(cfg.data)
    if not data_specs:
        if preset != "toy":
            raise ConfigError("--data DIR is required (an image-caption folder with metadata.jsonl)")
        data_specs = [TOY_DATA_PREFIX + "benign-a"]
    if len(data_specs) > 2:
        raise ConfigError("--data is given at most twice (the second is the second benign stage of --progressive)")
    if len(data_specs) == 2 and not cfg.progressive:
        raise ConfigError("a second --data is only used with --progressive")
    size = bundle.image_size
    toy_n = p.toy_data_size
    data = [load_pairs(d, size=size, toy_size=toy_n) for d in data_specs]
    harmful = None
    if cfg.harmful_data:
        harmful = load_pairs(cfg.harmful_data, size=size, toy_size=toy_n)
    notes: list[str] = []
    if cfg.contaminate is not None:
        if harmful is None:
            raise ConfigError("--contaminate needs --harmful-data DIR (the pairs mixed in)")
        if cfg.progressive:
            raise ConfigError("--contaminate and --progressive are separate experiments; choose one")
    if cfg.progressive and harmful is None:
        raise ConfigError("--progressive needs --harmful-data DIR (its last two stages)")
    if cfg.progressive:
        if steps < 4:
            raise ConfigError(f"--progressive splits --steps into 4 stages; got {steps} steps")
        stages = _progressive_stages(cfg, bundle, data, harmful, steps)
        dataset = "progressive(" + "+".join(d.name for d in data) + f"->{harmful.name})"
        notes.append("stages: " + ", ".join(f"{s.name} ({s.steps} steps)" for s in stages))
    else:
        d = data[0]
        if cfg.contaminate is not None:
            d = contaminate(d, harmful, cfg.contaminate, seed=cfg.seed)
            notes.append(f"{cfg.contaminate:.0%} of {data[0].name} replaced by {harmful.name} pairs")
        stages = [Stage(d, steps, d.name)]
        dataset = d.name
    prior = None
    if cfg.prior_data and uses_prior(cfg.adapt):
        prior = load_pairs(cfg.prior_data, size=size, toy_size=toy_n)
    elif cfg.prior_data:
        raise ConfigError(f"--prior-data: --adapt {cfg.adapt} trains on no prior pairs (e.g. --adapt dreambooth does)")
    return Plan(spec, stages, eval_every, dataset, prior, notes)


def _progressive_stages(cfg: AttackConfig, bundle: Any, data: list[Pairs], harmful: Pairs, steps: int) -> list[Stage]:
    """Four equal stages: benign, benign (second set), the less harmful half, all harmful data."""
    from resalign.eval.scoring import create_scorer, harm_scores

    preset = preset_name(bundle)
    name = (cfg.scorers or ["toy-harm" if preset == "toy" else "nudenet"])[0]
    scorer = create_scorer(name, cfg.scorer_options.get(name))
    order = np.argsort(harm_scores(scorer.score(np.asarray(harmful.images), list(harmful.prompts))), kind="stable")
    low = order[: max(1, len(order) // 2)]
    milder = Pairs(np.asarray(harmful.images)[low], [harmful.prompts[i] for i in low], f"{harmful.name}-milder-half")
    second = data[1] if len(data) > 1 else data[0]
    q = [steps // 4] * 4
    q[-1] += steps - sum(q)
    return [
        Stage(data[0], q[0], data[0].name),
        Stage(second, q[1], second.name),
        Stage(milder, q[2], milder.name),
        Stage(harmful, q[3], harmful.name),
    ]


def check_data_spec(spec: str, flag: str) -> None:
    """A ``--data``-style source names a toy set or an image-caption folder whose metadata parses."""
    if spec.startswith(TOY_DATA_PREFIX):
        from resalign.data.toy import IMAGE_SETS

        if spec[len(TOY_DATA_PREFIX):] not in IMAGE_SETS:
            raise ConfigError(f"{flag} {spec!r}: unknown toy set; expected one of "
                              + ", ".join(TOY_DATA_PREFIX + n for n in IMAGE_SETS))
        return
    if not Path(spec).is_dir():
        raise DataError(f"{flag} {spec!r}: no such folder (or name a toy set as toy-images:benign-a)")
    from resalign.data.folders import read_metadata

    read_metadata(spec)


def check_attack_config(cfg: AttackConfig) -> None:
    """Every setting of ``resalign attack`` that can be checked without the model."""
    from resalign.pipeline.evaluate import check_common, model_folder
    from resalign.validation import check_int, check_number

    adapter_class(cfg.adapt)
    if cfg.preset is not None and cfg.preset not in ATTACK_PRESETS:
        raise ConfigError(f"--preset {cfg.preset!r}: expected one of {', '.join(ATTACK_PRESETS)}")
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
    from resalign.eval.plots import plot_curves, save_grid

    check_attack_config(cfg)
    distributed.init(cfg.device)
    set_threads(cfg.threads)
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    preset = cfg.preset or preset_name(model.bundle)
    if preset not in ATTACK_PRESETS:
        raise ConfigError(f"--preset {preset!r}: expected one of {', '.join(ATTACK_PRESETS)}")
    gen_preset = preset_name(model.bundle)
    plan = plan_attack(cfg, model.bundle, preset)
    curve_sets, utility_sets = harmful_and_benign_sets(
        gen_preset, prompts=cfg.prompts, benign_prompts=cfg.benign_prompts, categories=cfg.category,
        limit=cfg.limit, scorers=cfg.scorers, toy_prompts=cfg.toy_prompts,
    )
    gen = resolve_generation(gen_preset, cfg.images_per_prompt, cfg.sample_steps, cfg.guidance, cfg.gen_batch_size)
    check_scorer_options(cfg.scorer_options, curve_sets + utility_sets)
    curve_eval = Evaluator(model.bundle, curve_sets, gen, scorer_options=options_for(cfg.scorer_options, curve_sets))
    utility_eval = (
        Evaluator(model.bundle, utility_sets, gen, scorer_options=options_for(cfg.scorer_options, utility_sets))
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
    curves: dict[int, list[list[Figure]]] = {}
    utility: dict[str, list[list[Figure]]] = {"before_ft": [], "after_ft": []}
    samples: dict[str, np.ndarray] = {}
    for outcome in outcomes:  # in seed order, as one process computes them
        for step, figs in outcome.value["curves"].items():
            curves.setdefault(int(step), []).append(figures_of(figs))
        for stage, figs in outcome.value["utility"].items():
            utility[stage].append(figures_of(figs))
        samples.update(samples_of(outcome.value["samples"], outcome.arrays))
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
