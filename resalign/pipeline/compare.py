"""``resalign compare``: the paper's Table 1 experiment (Sec. 4.2 "Main Results").

For the base model, plain-unlearning baselines and ResAlign:

1. unlearn (``resalign run`` through :func:`resalign.pipeline.run.execute`): each baseline is the same
   objective with β = 0 (Eq. 2: L_harm + α·R, no hypergradient term) and its own harmful loss (GA,
   ESD, CA); ResAlign is Alg. 2 with its defaults;
2. measure before fine-tuning: harmful rate on every harmful prompt set and benign utility, over
   seeds;
3. fine-tune each unlearned model on two benign datasets (the downstream protocol of App. B.4, as
   ``resalign attack``), once per seed, and measure the harmful rate again.

The base model is only measured before fine-tuning, as in Tab. 1. Every figure is the mean ± SEM over
the seeds (3 by default; Sec. 4.1). Baselines run with ResAlign's outer steps, learning rate, α and
data, so their direct harmful-loss weight (1) is larger than ResAlign's (1 − β): they are unlearned at
least as hard per step. The report checks that no baseline ends weaker than ResAlign before fine-tuning
(its before-FT harmful rate no more than 2 SEM above ResAlign's) and says so when one does.

The toy defaults are budgeted to finish on two CPU cores in under 20 minutes: 50 prompts per set and
seed (150 images per figure over 3 seeds), 10 DDIM steps for the evaluation images, 200 fine-tuning
steps per run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resalign.errors import ConfigError
from resalign.eval.report import MarkdownTable, TidyReport
from resalign.pipeline.attack import ATTACK_PRESETS, load_pairs
from resalign.pipeline.evaluate import (
    SEED_STRIDE,
    Bars,
    EvalSet,
    Evaluator,
    Figure,
    add_figures,
    build_sets,
    load_model,
    options_for,
    preset_name,
    resolve_generation,
    set_threads,
)
from resalign.pipeline.finetune import Finetuner, FinetuneSpec, Stage

#: Methods compare knows: the base model, β = 0 baselines by harmful loss, and ResAlign.
BASELINE_LOSSES = ("ga", "esd", "ca")
DEFAULT_METHODS = ("base", "ga", "esd", "ca", "resalign")


@dataclass(frozen=True)
class ComparePreset:
    """Evaluation sizes and fine-tuning datasets of a preset."""

    datasets: tuple[str, ...]
    prompts_per_set: int | None
    sample_steps: int | None


COMPARE_PRESETS: dict[str, ComparePreset] = {
    "toy": ComparePreset(datasets=("toy-images:benign-a", "toy-images:benign-b"), prompts_per_set=50, sample_steps=10),
    "paper": ComparePreset(datasets=(), prompts_per_set=None, sample_steps=None),
}


@dataclass
class CompareConfig:
    """Settings of ``resalign compare`` (None: the preset's value)."""

    model: str | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    runs: dict[str, str] = field(default_factory=dict)  # method -> existing run directory
    unlearn: dict[str, Any] = field(default_factory=dict)  # RunConfig overrides for every unlearning run
    datasets: list[str] = field(default_factory=list)
    adapt: str = "full"
    ft_steps: int | None = None
    lr: float | None = None
    optimizer: str = "adamw"
    seeds: int = 3
    seed: int = 0
    prompts: str | None = None
    benign_prompts: str | None = None
    category: list[str] = field(default_factory=list)
    limit: int | None = None
    scorers: list[str] = field(default_factory=list)
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    toy_prompts: int | None = None
    images_per_prompt: int | None = None
    sample_steps: int | None = None
    guidance: float | None = None
    gen_batch_size: int = 128
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = 1
    results_md: str | None = None  # also write the table here (docs/results.md)


def method_run_config(method: str, model: str | None, seed: int, overrides: Mapping[str, Any], device: str, dtype: str):
    """The :class:`RunConfig` that unlearns ``method``: a β = 0 baseline or ResAlign (``resalign[-LOSS]``)."""
    from resalign.config import from_dict
    from resalign.pipeline.run import RunConfig

    kw: dict[str, Any] = dict(overrides)
    for key in ("model", "seed", "device", "dtype", "loss", "beta"):
        if key in kw:
            raise ConfigError(f"--unlearn-option {key}=...: compare sets {key} itself (see --help)")
    if model is not None:
        kw["model"] = model
    kw.update(seed=seed, device=device, dtype=dtype)
    if method in BASELINE_LOSSES:
        kw.update(loss=method, beta=0.0)
    elif method == "resalign" or method.startswith("resalign-"):
        if "-" in method:
            kw["loss"] = method.split("-", 1)[1]
    else:
        raise ConfigError(
            f"method {method!r}: expected base, {', '.join(BASELINE_LOSSES)}, resalign or resalign-LOSS"
        )
    return from_dict(RunConfig, kw, where="--unlearn-option")


def shared_data(data: Any, run_dir: Path) -> Any:
    """The training data of a finished run as image-caption folder sources, for the next runs.

    Every unlearning run of a comparison starts from the same model with the same seed, so it would
    generate the very same D_harmful, D_preserve and D_FT (B.4); reading the first run's cached
    folders instead saves that generation without changing a single pair.
    """
    from resalign.pipeline.data import SETS, SourceConfig

    folders = {name: run_dir / "data" / name for name in SETS}
    if not all((f / "metadata.jsonl").is_file() for f in folders.values()):
        return data
    return dataclasses.replace(data, **{name: [SourceConfig(source=str(f))] for name, f in folders.items()})


def _check_methods(methods: Sequence[str], runs: Mapping[str, str]) -> None:
    if not methods:
        raise ConfigError("--methods: nothing to compare")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {', '.join(methods)}")
    for m in methods:
        if m != "base" and m not in BASELINE_LOSSES and not (m == "resalign" or m.startswith("resalign-")):
            raise ConfigError(f"--methods {m!r}: expected base, {', '.join(BASELINE_LOSSES)}, resalign or resalign-LOSS")
    extra = sorted(set(runs) - set(methods))
    if extra:
        raise ConfigError(f"--run {', '.join(extra)}: not among --methods ({', '.join(methods)})")
    for m, path in runs.items():
        if m == "base":
            raise ConfigError("--run base=...: the base model is --model")
        if not (Path(path) / "model" / "unet").is_dir():
            raise ConfigError(f"--run {m}={path}: not a run directory with model/unet/")


def run_compare(cfg: CompareConfig, out: str | Path, *, progress: bool = True) -> tuple[Path, TidyReport]:
    """``resalign compare``: unlearn, measure before, fine-tune on each dataset per seed, measure after."""
    from resalign.config import to_dict
    from resalign.pipeline.run import resolve
    from resalign.rundir import RunDir

    set_threads(cfg.threads)
    if cfg.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {cfg.seeds}")
    _check_methods(cfg.methods, cfg.runs)
    base = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    gen_preset = preset_name(base.bundle)
    cp = COMPARE_PRESETS[gen_preset]
    ap = ATTACK_PRESETS[gen_preset]
    datasets = list(cfg.datasets) or list(cp.datasets)
    if not datasets:
        raise ConfigError("--dataset DIR (twice, the two benign fine-tuning sets) is required outside the toy world")
    ft_data = [load_pairs(d, size=base.bundle.image_size, toy_size=ap.toy_data_size) for d in datasets]
    spec = FinetuneSpec(
        adapt=cfg.adapt, steps=cfg.ft_steps if cfg.ft_steps is not None else ap.steps,
        lr=cfg.lr if cfg.lr is not None else ap.lr[cfg.adapt], optimizer=cfg.optimizer,
    ).validate()
    toy_n = cfg.toy_prompts or cp.prompts_per_set
    harm_sets = build_sets(gen_preset, prompts_file=cfg.prompts, categories=cfg.category, limit=cfg.limit,
                           scorers=cfg.scorers, toy_prompts=toy_n,
                           only=None if cfg.prompts else ("harmful", "implicit"))
    benign_sets: list[EvalSet] = []
    if cfg.benign_prompts:
        benign_sets = build_sets(gen_preset, prompts_file=cfg.benign_prompts, limit=cfg.limit, role="benign",
                                 scorers=cfg.scorers)
    elif gen_preset == "toy" and not cfg.prompts:
        benign_sets = build_sets("toy", toy_prompts=toy_n, only=("benign",), limit=cfg.limit, scorers=cfg.scorers)
    gen = resolve_generation(gen_preset, cfg.images_per_prompt, cfg.sample_steps or cp.sample_steps, cfg.guidance,
                             cfg.gen_batch_size)
    before_eval = Evaluator(base.bundle, harm_sets + benign_sets, gen, scorer_options=cfg.scorer_options)
    after_eval = Evaluator(base.bundle, harm_sets, gen, scorer_options=options_for(cfg.scorer_options, harm_sets))
    unlearn_cfgs = {
        m: method_run_config(m, cfg.model, cfg.seed, cfg.unlearn, cfg.device, cfg.dtype)
        for m in cfg.methods if m != "base" and m not in cfg.runs
    }
    run = RunDir(out, command="compare")
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    run.write_config({"command": "compare", **to_dict(cfg), "seeds_used": seeds})
    report = TidyReport("compare")
    report.settings.update(
        base_model=base.label, base_model_path=base.path, methods=list(cfg.methods), seeds=seeds,
        finetune=dataclasses.asdict(spec) | {"lr": spec.resolved_lr()}, datasets=[d.name for d in ft_data],
        evaluation=before_eval.describe(), config=to_dict(cfg),
        unlearning={m: to_dict(resolve(c)) for m, c in unlearn_cfgs.items()}, reused_runs=dict(cfg.runs),
        prompt_sets={"harmful": [s.name for s in harm_sets], "benign": [s.name for s in benign_sets]},
    )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    samples: dict[str, np.ndarray] = {}
    # 1. unlearning runs (each shows its own progress display)
    from resalign.pipeline.run import execute

    run_dirs = dict(cfg.runs)
    shared = None
    for m, rc in unlearn_cfgs.items():
        if shared is not None:
            rc = dataclasses.replace(rc, data=shared)
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold]unlearning: {m}[/] ({_describe_run(rc)})", highlight=False)
        report.settings["unlearning"][m] = to_dict(resolve(rc))
        t0 = time.perf_counter()
        run_dirs[m] = str(execute(rc, run.path / "unlearn" / m, progress=progress))
        timings[f"unlearn {m}"] = time.perf_counter() - t0
        if shared is None and "data" not in cfg.unlearn:
            shared = shared_data(resolve(rc).data, Path(run_dirs[m]))
    report.settings["run_dirs"] = run_dirs
    with Bars(progress) as bars:
        # 2. + 3. measure before, fine-tune per dataset and seed, measure after
        outer = bars.task("compare: models", len(cfg.methods), keep=True)
        for i, m in enumerate(cfg.methods):
            model = base if m == "base" else load_model(run_dirs[m], device=cfg.device, dtype=cfg.dtype)
            t0 = time.perf_counter()
            before: list[list[Figure]] = []
            for k, seed in enumerate(seeds):
                figs, imgs = before_eval.evaluate(bundle=model.bundle, seed=cfg.seed + k * SEED_STRIDE, bars=bars,
                                                  label=f"{m} before, seed {seed}: ", keep_images=k == 0)
                before.append(figs)
                if k == 0:
                    samples[f"{m} · before"] = imgs[harm_sets[0].name][:8]
            add_figures(report, before, model=m, stage="before_ft")
            timings[f"evaluate {m} before"] = time.perf_counter() - t0
            if m != "base":
                for d in ft_data:
                    t0 = time.perf_counter()
                    after: list[list[Figure]] = []
                    for k, seed in enumerate(seeds):
                        ft = Finetuner(model.bundle, spec, [Stage(d, spec.steps, d.name)], seed=seed)
                        bar = bars.task(f"{m}: fine-tuning on {d.name}, seed {seed}", spec.steps)
                        params = ft.run(progress=lambda s, t, loss: bar(s, t))
                        figs, imgs = after_eval.evaluate(bundle=model.bundle, params=params,
                                                         seed=cfg.seed + k * SEED_STRIDE, bars=bars,
                                                         label=f"{m} after {d.name}, seed {seed}: ",
                                                         keep_images=k == 0)
                        after.append(figs)
                        if k == 0:
                            samples[f"{m} · after {d.name}"] = imgs[harm_sets[0].name][:8]
                    add_figures(report, after, model=m, stage="after_ft", finetune=spec.adapt, dataset=d.name)
                    timings[f"fine-tune and evaluate {m} on {d.name}"] = time.perf_counter() - t0
            outer(i + 1)
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    report.settings["timings"] = {k: round(v, 1) for k, v in timings.items()}
    checks = strength_and_finding_checks(report, cfg.methods, [d.name for d in ft_data], harm_sets[0].name)
    report.settings["checks"] = checks
    tables = compare_tables(report)
    figures = _plots(run.path, report, cfg.methods, [d.name for d in ft_data], harm_sets, samples)
    intro = _intro(report, spec, seeds, checks)
    report.write(run.path, title="resalign compare: harmful rate before and after benign fine-tuning",
                 intro=intro, tables=tables, figures=figures)
    if cfg.results_md:
        write_results_md(Path(cfg.results_md), report, tables, checks, run.path)
    return run.path, report


def _describe_run(rc: Any) -> str:
    fields = ("loss", "beta", "alpha", "solver", "outer_steps")
    return ", ".join(f"{f}={getattr(rc, f)}" for f in fields if hasattr(rc, f))


# --------------------------------------------------------------------------- tables, checks, plots


def compare_tables(report: TidyReport) -> list[MarkdownTable]:
    """Tab. 1's layout: harmful rate before and after fine-tuning on each dataset; benign utility.

    Methods, datasets and prompt sets are read from the report's settings, so a saved
    ``report.json`` renders the same tables.
    """
    st = report.settings
    methods, datasets = st["methods"], st["datasets"]
    harm_names, ben_names = st["prompt_sets"]["harmful"], st["prompt_sets"]["benign"]
    rows = [r for r in report.results if r["metric"] == "harmful_rate" and r.get("prompts") in harm_names]
    sub = TidyReport("compare", results=rows)

    def col(r):
        return f"before FT: {r['prompts']}" if r["stage"] == "before_ft" else f"after FT on {r['dataset']}: {r['prompts']}"

    cols = [f"before FT: {p}" for p in harm_names] + [f"after FT on {d}: {p}" for d in datasets for p in harm_names]
    tables = [sub.pivot("model", col, rows_order=methods, cols_order=cols, corner="model",
                        title="Harmful rate (mean ± SEM over seeds; lower is safer)")]
    if ben_names:
        urows = [r for r in report.results if r.get("prompts") in ben_names and r["stage"] == "before_ft"]
        usub = TidyReport("compare", results=urows)
        tables.append(usub.pivot("model", lambda r: f"{r['metric']} ({r['prompts']})", rows_order=methods,
                                 corner="model", title="Benign generation before fine-tuning (utility)"))
    return tables


def strength_and_finding_checks(
    report: TidyReport, methods: Sequence[str], datasets: Sequence[str], prompts: str
) -> dict[str, Any]:
    """The statements the experiment is about, checked on the measured rows.

    * ``matched``: for each baseline, whether its before-FT harmful rate is at most ResAlign's + 2 SEM
      (it is unlearned at least about as strongly, so the after-FT comparison does not favour ResAlign);
    * ``rebound``: for each baseline and dataset, the after-FT minus before-FT harmful rate;
    * ``resalign_lowest``: per dataset, whether ResAlign's after-FT rate is below every baseline's.
    """
    def row(**k):
        return report.get(metric="harmful_rate", prompts=prompts, **k)

    out: dict[str, Any] = {"prompts": prompts, "matched": {}, "rebound": {}, "resalign_lowest": {}}
    ours = next((m for m in methods if m.startswith("resalign")), None)
    baselines = [m for m in methods if m in BASELINE_LOSSES]
    ref = row(model=ours, stage="before_ft") if ours else None
    for b in baselines:
        r = row(model=b, stage="before_ft")
        if ref is not None and r is not None:
            margin = 2 * math.hypot(r["sem"], ref["sem"])
            out["matched"][b] = bool(r["mean"] <= ref["mean"] + margin)
        for d in datasets:
            a = row(model=b, stage="after_ft", dataset=d)
            if a is not None and r is not None:
                out["rebound"][f"{b}/{d}"] = a["mean"] - r["mean"]
    if ours:
        for d in datasets:
            mine = row(model=ours, stage="after_ft", dataset=d)
            others = [row(model=b, stage="after_ft", dataset=d) for b in baselines]
            if mine is not None and others and all(o is not None for o in others):
                out["resalign_lowest"][d] = bool(all(mine["mean"] < o["mean"] for o in others))
    return out


def _intro(report: TidyReport, spec: FinetuneSpec, seeds: Sequence[int], checks: Mapping[str, Any]) -> str:
    lines = [
        f"Fine-tuning after unlearning: **{spec.adapt}**, {spec.steps} steps, lr {spec.resolved_lr():g}, "
        f"{spec.optimizer}, batch {spec.batch_size}; seeds {', '.join(map(str, seeds))}. "
        f"Harmful rate on the `{checks['prompts']}` prompts is the headline figure.",
    ]
    for b, ok in checks["matched"].items():
        if not ok:
            lines.append(f"- Note: baseline `{b}` is weaker than ResAlign before fine-tuning (its before-FT harmful "
                         "rate exceeds ResAlign's by more than 2 SEM): its after-FT figure is not a matched comparison.")
    for d, ok in checks["resalign_lowest"].items():
        lines.append(f"- After fine-tuning on {d}: ResAlign's harmful rate is "
                     f"{'lower than every baseline' if ok else 'NOT lower than every baseline'}'s.")
    return "\n".join(lines)


def _plots(path: Path, report: TidyReport, methods, datasets, harm_sets, samples) -> list[tuple[str, str]]:
    from resalign.eval.plots import plot_bars, save_grid

    figures = []
    for s in harm_sets:
        rows = [r for r in report.results if r["metric"] == "harmful_rate" and r.get("prompts") == s.name]
        name = f"harmful_rate_{s.name}.png"

        def bar(r):
            return "before FT" if r["stage"] == "before_ft" else f"after FT on {r['dataset']}"

        plot_bars(rows, path / name, bar=bar, groups_order=list(methods),
                  bars_order=["before FT"] + [f"after FT on {d}" for d in datasets],
                  title=f"Harmful rate on '{s.name}' prompts (mean ± SEM)")
        figures.append((f"Harmful rate on the {s.name} prompts, before and after benign fine-tuning", name))
    if samples:
        save_grid(samples, path / "samples.png", title=f"'{harm_sets[0].name}' prompts, first seed")
        figures.append(("Samples for the harmful prompts, before and after fine-tuning (first seed)", "samples.png"))
    return figures


def write_results_md(path: Path, report: TidyReport, tables: Sequence[MarkdownTable], checks: Mapping[str, Any],
                     run_path: Path) -> Path:
    """``docs/results.md``: the table with its settings, regenerated by ``resalign compare --results-md``."""
    from resalign.rundir import atomic_write_text

    s = report.settings
    cfg = s.get("config", {})
    cmd = "resalign compare --results-md " + str(path)
    from resalign.config import to_dict

    defaults = to_dict(CompareConfig())
    changed = {k: v for k, v in cfg.items() if k != "results_md" and v != defaults.get(k)}
    lines = [
        "# Results: resilience of unlearning to benign fine-tuning (toy world)" if s.get("base_model") == "toy-base"
        else "# Results: resilience of unlearning to benign fine-tuning",
        "",
        f"Regenerate with `{cmd}`"
        + (f" plus these non-default settings: `{changed}`" if changed else " (every other setting at its default)")
        + f"; this run took {s.get('seconds', 0) / 60:.1f} minutes. Run directory of this table: `{run_path}`.",
        "",
        f"Base model `{s.get('base_model')}`; methods {', '.join(s.get('methods', []))}; "
        f"fine-tuning {s['finetune']['adapt']} for {s['finetune']['steps']} steps at lr {s['finetune']['lr']:g} "
        f"({s['finetune']['optimizer']}, batch {s['finetune']['batch_size']}) on {', '.join(s.get('datasets', []))}; "
        f"seeds {', '.join(map(str, s.get('seeds', [])))}; resalign {s.get('versions', {}).get('resalign', '')}, "
        f"torch {s.get('versions', {}).get('torch', '')}.",
        "",
    ]
    for t in tables:
        lines.append(t.render())
    lines.append("Checks:")
    lines.append("")
    for b, ok in checks["matched"].items():
        lines.append(f"- `{b}` unlearned at least as strongly as ResAlign before fine-tuning (within 2 SEM): {'yes' if ok else 'no'}")
    for k, v in checks["rebound"].items():
        lines.append(f"- rebound of `{k}` (after − before, `{checks['prompts']}` prompts): {v:+.3f}")
    for d, ok in checks["resalign_lowest"].items():
        lines.append(f"- ResAlign lowest after fine-tuning on {d}: {'yes' if ok else 'no'}")
    lines.append("")
    lines += ["Unlearning settings per method are in the run directory's `report.json` (`settings.unlearning`).", ""]
    return atomic_write_text(path, "\n".join(lines))

