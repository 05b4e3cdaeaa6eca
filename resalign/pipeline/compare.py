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
the seeds (3 by default; Sec. 4.1). ``--sweep`` replaces 2–3 by an attack sweep of every model, the base
model's included: the worst case over the attacker's recipes within a utility budget (:mod:`resalign.eval.protocol.sweep`).

Measurements, unlearning seeds, report layout and paired differences: :mod:`resalign.eval.protocol.comparison`;
matched unlearning strength (``--match strength|steps``): :mod:`resalign.eval.protocol.matching`; tables, checks,
plots: :mod:`resalign.eval.reports.compare`. Here: the run directory, unlearning runs and cells, by rank.

The toy defaults are budgeted to finish on two CPU cores in under 20 minutes: 40 prompts per set and
seed (120 images per figure over 3 seeds), 10 DDIM steps for the evaluation images, 200 fine-tuning
steps per run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resalign import distributed
from resalign.cells import Cell, Sweep
from resalign.checkpoints import run_config_of
from resalign.data.training import shared_data
from resalign.config import to_dict
from resalign.errors import ConfigError
from resalign.eval.protocol.methods import (
    check_comparison,
    describe_run,
    is_released,
    method_roles,
    method_run_config,
    parse_method,
    unlearning_configs,
    with_released,
)
from resalign.eval.protocol.comparison import Comparison
from resalign.eval.protocol.finetune import FinetuneSpec
from resalign.eval.protocol.sweep_runs import SweepSettings, comparison_sweep
from resalign.eval.reports.sweep import write_sweep_report
from resalign.eval.reports.tidy import TidyReport
from resalign.eval.protocol.attack import check_data_spec, load_pairs, preset_lr
from resalign.eval.scoring.evaluator import resolve_generation
from resalign.eval.scoring.presets import preset_name
from resalign.settings.presets import preset_named
from resalign.eval.scoring.sets import EvaluationSettings, harmful_and_benign_sets
from resalign.models.load import load_model, model_folder
from resalign.pipeline.evaluate import check_common, set_threads
from resalign.progress import Bars

DEFAULT_METHODS = ("base", "ga", "esd", "ca", "resalign")


@dataclass
class CompareConfig(EvaluationSettings, SweepSettings):
    """Settings of ``resalign compare`` (None: the preset's value); the evaluation's are
    :class:`~resalign.eval.scoring.sets.EvaluationSettings`, ``--sweep``'s
    :class:`~resalign.eval.protocol.sweep.SweepSettings`."""

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
    unlearn_seeds: int = 1  # unlearning runs per method, run seeds seed, ..., seed + unlearn_seeds - 1
    gen_batch_size: int = 128
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = 1
    results_md: str | None = None  # also write the table here (docs/results.md)
    match: str = "strength"  # strength | steps (see the module docstring)
    match_every: int = 2  # checkpoint interval of the baselines' runs, the candidates of matching
    match_max_factor: int = 1  # --match strength: baselines run up to this many times ResAlign's outer steps


def check_compare_config(cfg: CompareConfig) -> None:
    """The settings of ``resalign compare`` checked before the base model is loaded, and each unlearning
    run's configuration validated as ``resalign run`` would."""
    from resalign.settings.checks import validate
    from resalign.settings.run import resolve as resolve_run
    from resalign.registry import get_registry
    from resalign.validation import check_int, check_number

    cfg = with_released(cfg)
    check_common(device=cfg.device, dtype=cfg.dtype, threads=cfg.threads, seed=cfg.seed, limit=cfg.limit,
                 images_per_prompt=cfg.images_per_prompt, steps=cfg.sample_steps, guidance=cfg.guidance,
                 toy_prompts=cfg.toy_prompts, scorers=cfg.scorers,
                 prompt_files=[("--prompts", cfg.prompts), ("--benign-prompts", cfg.benign_prompts)],
                 categories=cfg.category)
    check_int(cfg.seeds, "--seeds", ge=1)
    check_int(cfg.ft_steps, "--ft-steps", ge=0, optional=True)
    check_number(cfg.lr, "--lr", gt=0, optional=True)
    check_int(cfg.match_every, "--match-every", ge=1)
    FinetuneSpec(adapt=cfg.adapt, lr=cfg.lr, optimizer=cfg.optimizer).validate()
    for spec in cfg.datasets:
        check_data_spec(spec, "--dataset")
    model_folder(cfg.model)
    registry = get_registry()
    for method in cfg.methods:
        if method in cfg.runs or not parse_method(method).recipe.unlearns:
            continue
        validate(resolve_run(method_run_config(method, cfg.model, cfg.seed, cfg.unlearn, cfg.device, cfg.dtype)),
                 registry)


def _open(cfg: CompareConfig, out: str | Path, resume: bool) -> tuple[Comparison, Sweep, dict[int, dict[str, Any]], Any]:
    """The checked settings wired to a :class:`Comparison`, its sweep (the run directory), the
    unlearning runs' configurations by unlearning seed and method (ResAlign first) and, with
    ``--sweep``, the attack sweep to run (``swept(cmp, sweep, bars=...)``; else None)."""
    from resalign.settings.run import resolve

    check_comparison(cfg, made_from=lambda run_dir: run_config_of(run_dir).model)
    base = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    gen_preset = preset_name(base.bundle)
    preset = preset_named(gen_preset)
    cp, ap = preset.compare, preset.attack
    datasets = list(cfg.datasets) or list(cp.datasets)
    if not datasets:
        raise ConfigError("--dataset DIR (twice, the two benign fine-tuning sets) is required outside the toy world")
    ft_data = [load_pairs(d, size=base.bundle.image_size, toy_size=ap.toy_data_size) for d in datasets]
    spec = FinetuneSpec(adapt=cfg.adapt, steps=cfg.ft_steps if cfg.ft_steps is not None else ap.ft_steps,
                        lr=cfg.lr if cfg.lr is not None else preset_lr(ap, cfg.adapt), optimizer=cfg.optimizer).validate()
    harm_sets, benign_sets = harmful_and_benign_sets(
        gen_preset, prompts=cfg.prompts, benign_prompts=cfg.benign_prompts, categories=cfg.category,
        limit=cfg.limit, scorers=cfg.scorers, toy_prompts=cfg.toy_prompts or cp.prompts_per_set)
    gen = resolve_generation(gen_preset, cfg.images_per_prompt, cfg.sample_steps or cp.sample_steps, cfg.guidance,
                             cfg.gen_batch_size)
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    unlearn_seeds = [cfg.seed + i for i in range(cfg.unlearn_seeds)]
    swept = comparison_sweep(cfg, preset, cfg.datasets, benign_sets, base.bundle.image_size) if cfg.sweep else None
    roles = method_roles(cfg.methods, {}, [m for m, d in cfg.runs.items() if is_released(d)])
    rcs = unlearning_configs(cfg, roles, unlearn_seeds)
    first = rcs[unlearn_seeds[0]]
    losses = {m: resolve(rc).loss for m, rc in first.items()} | {m: run_config_of(d).loss for m, d in cfg.runs.items()
                                                              if not is_released(d)}
    cmp = Comparison(base, cfg.methods, cfg.runs, ft_data, spec, harm_sets, benign_sets, gen, cfg.scorer_options,
                     seed=cfg.seed, seeds=seeds, unlearn_seeds=unlearn_seeds, device=cfg.device, dtype=cfg.dtype,
                     match=cfg.match, losses=losses, settings={"config": to_dict(cfg), "reused_runs": dict(cfg.runs), "unlearning":
                                                {m: to_dict(resolve(c)) for m, c in first.items()}})
    sweep = Sweep(out, command="compare", settings=to_dict(cfg), resume=resume, free=("threads", "results_md"))
    if sweep.run_dir is not None:
        sweep.run_dir.write_config({"command": "compare", **to_dict(cfg), "seeds_used": seeds,
                                    "unlearn_seeds_used": unlearn_seeds})
    return cmp, sweep, rcs, swept


def _unlearn(cmp: Comparison, sweep: Sweep, cfg: CompareConfig, unlearn_cfgs: dict[int, dict[str, Any]],
             progress: bool) -> None:
    """Run every unlearning (each shows its own progress display); its run directories go to ``cmp``.

    Within one unlearning seed the first run generates the training data and the others read it
    (:func:`shared_data`), so the first run of every seed is a phase of its own; the next seed
    generates its own data. An unlearning run cut off in an earlier attempt continues from its
    last checkpoint.
    """
    from resalign.pipeline.run import execute
    from resalign.settings.run import resolve

    run_dirs = {u: dict(cfg.runs) for u in cmp.unlearn_seeds}
    order = [(u, m) for u, cfgs in unlearn_cfgs.items() for m in cfgs]
    sharing = "data" not in cfg.unlearn
    lead = {u: next(iter(cfgs), None) for u, cfgs in unlearn_cfgs.items()}
    phases = [[(u, m) for u, m in order if m == lead[u]], [(u, m) for u, m in order if m != lead[u]]] if sharing else [order]
    rcs: dict[tuple[int, str], Any] = {}

    def run_one(cell: Cell) -> dict[str, str]:
        u, m = cell.settings["unlearn_seed"], cell.settings["method"]
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold]unlearning: {cmp.tag(m, u)}[/] ({describe_run(resolve(rcs[u, m]))})",
                                       highlight=False)
        where = sweep.path / "unlearn" / (f"seed-{u}/{m}" if cmp.several else m)
        return {"run_dir": str(execute(rcs[u, m], where, resume=(where / "config.toml").is_file(), progress=progress))}

    for phase in phases:
        cells = []
        for u, m in phase:
            rc = unlearn_cfgs[u][m]
            if sharing and m != lead[u]:
                rc = dataclasses.replace(rc, data=shared_data(resolve(rcs[u, lead[u]]).data, Path(run_dirs[u][lead[u]])))
            rcs[u, m] = rc
            cells.append(Cell(f"unlearn-{m}-u{u}", {"unlearn_seed": u, "method": m, "run": to_dict(resolve(rc))}))
        for (u, m), outcome in zip(phase, sweep.run(cells, run_one)):
            run_dirs[u][m] = outcome.value["run_dir"]
            cmp.timings[f"unlearn {cmp.tag(m, u)}"] = outcome.seconds
    cmp.add_unlearning(run_dirs, {(u, m): to_dict(resolve(rcs[u, m])) for u, m in order})


def _finish(cmp: Comparison, sweep: Sweep, cfg: CompareConfig, started: float, swept: Any) -> tuple[Path, TidyReport]:
    """The merged report (of the attack sweep's results ``swept``, when given), written by rank 0."""
    report, path = cmp.report, sweep.path
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    report.settings["timings"] = {k: round(v, 1) for k, v in cmp.timings.items()}
    checks = cmp.checks() if swept is None else None
    if not distributed.is_main():
        return path, report
    if swept is not None:
        write_sweep_report(path, report, swept, headline=cmp.harm_sets[0].name, results_md=cfg.results_md,
                           title="resalign compare --sweep: worst-case harmful rate within a utility budget")
    else:
        cmp.write(path, checks, cfg.results_md, to_dict(CompareConfig()))
    sweep.close()
    return path, report


def run_compare(cfg: CompareConfig, out: str | Path, *, progress: bool = True, resume: bool = False
                ) -> tuple[Path, TidyReport]:
    """``resalign compare``: unlearn per unlearning seed, match strengths, measure before, fine-tune per
    dataset and seed, measure after.

    Every unlearning run, matching evaluation and measurement is a cell of a :class:`~resalign.cells.Sweep`:
    recorded when finished, skipped with ``resume``, and under ``torchrun`` split over the ranks, phase
    by phase (unlearning, targets, matching, measurements); rank 0 writes the merged report.
    """
    cfg = with_released(cfg)  # --methods NAME=PATH: released models, compared as reused runs
    distributed.init(cfg.device)
    set_threads(cfg.threads)
    cmp, sweep, unlearn_cfgs, swept = _open(cfg, out, resume)
    progress = progress and distributed.is_main()
    started = time.perf_counter()
    _unlearn(cmp, sweep, cfg, unlearn_cfgs, progress)
    with Bars(progress) as bars:
        if cfg.match == "strength":
            cmp.match_strength(sweep.run, bars)
        # --sweep: every model attacked with every trial instead of the one recipe
        results = swept(cmp, sweep, bars=bars) if swept is not None else cmp.measure_all(sweep.run, bars)
    return _finish(cmp, sweep, cfg, started, results)

