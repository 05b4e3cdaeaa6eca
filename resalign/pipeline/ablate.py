"""``resalign ablate``: hypergradient solvers (Appendix E.1, Fig. 5) and method components (Tab. 6, 7).

``ablate solvers`` measures every solver on simulated fine-tunings sampled from the run's pool π(C):
fidelity (cosine and relative error against the exact, unrolled hypergradient) and cost (seconds, peak
memory), both :mod:`resalign.eval.ablation.measure`'s, and its effect: the harmful rate after benign fine-tuning
of short ResAlign runs that use it. ``ablate components`` reproduces Tab. 6 (no hypergradient, no
meta-learning over configurations or over data, the full method) and, with ``--J 1,3,5``, Tab. 7.
Tables: :mod:`resalign.eval.ablation.tables`; plots: :mod:`resalign.eval.ablation.plots`.

Both are sweeps (:mod:`resalign.cells`): every fidelity seed and every effect run is a cell, recorded
when finished, skipped with ``--resume``, and split over the processes of a ``torchrun`` job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resalign import distributed
from resalign.cells import Cell, Outcome, Sweep
from resalign.components import FinetuneConfig
from resalign.config import to_dict
from resalign.eval.ablation import measure as ablation
from resalign.eval.ablation.plots import component_figures, solver_figures
from resalign.eval.ablation.tables import effect_table, solver_tables
from resalign.eval.reports.tidy import TidyReport


@dataclass
class EffectConfig:
    """Short ResAlign runs followed by benign fine-tuning (the ``effect`` figures)."""

    enabled: bool = True
    #: solvers given an effect run (``ablate solvers``); unrolled's, the slowest, only on request
    solvers: list[str] = field(default_factory=lambda: ["richardson", "first-order"])
    #: outer steps of each effect run: the toy preset's, so the runs unlearn as far as ``resalign run``
    outer_steps: int = 30
    ft_data: str = "toy-images:benign-a"
    adapt: str = "full"  # the downstream fine-tuning method (any registered adapter)
    ft_steps: int = 100
    ft_seeds: int = 2
    eval_prompts: int = 40


@dataclass
class AblateSolversConfig:
    model: str | None = None
    solvers: list[str] = field(default_factory=lambda: ["richardson", "first-order", "unrolled"])
    K: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
    gamma: list[float] = field(default_factory=lambda: [0.1, 1.0])
    #: initial iterates of solvers with an ``x0`` option (richardson: "zero", Alg. 1, or "grad", x_0 = g)
    x0: list[str] = field(default_factory=lambda: ["zero", "grad"])
    #: curvature operators of Eq. 6 for the solvers that use one (those with a ``K``): resalign.core.curvature
    curvature: list[str] = field(default_factory=lambda: ["hessian", "gauss-newton"])
    #: how γ is set per configuration: fixed (γ as swept) and/or reach (γ · T · lr, MethodSettings.proximity)
    gamma_rule: list[str] = field(default_factory=lambda: ["fixed"])
    seeds: int = 3
    configs: int = 1  # sampled configurations per seed in each (ADAPT method, optimizer) cell of the pool
    max_steps: int = 30  # T cap of the sampled configurations (exact unrolling)
    loss: str | None = None  # None: the run preset's harmful loss
    run: dict[str, Any] = field(default_factory=dict)  # further RunConfig settings
    effect: EffectConfig = field(default_factory=EffectConfig)
    device: str = "cpu"
    threads: int = 1


@dataclass
class AblateComponentsConfig:
    model: str | None = None
    variants: list[str] = field(default_factory=lambda: ["full", "no-hypergradient", "no-meta-config", "no-meta-data"])
    J: list[int] = field(default_factory=list)
    #: label of the ``no-meta-config`` configuration (e.g. "full/adam/lr=0.001/T=5/denoise"); None: the
    #: pool's first full-parameter Adam configuration
    fixed_config: str | None = None
    seed: int = 0
    loss: str | None = None  # None: the run preset's harmful loss
    run: dict[str, Any] = field(default_factory=dict)
    #: 200 benign fine-tuning steps, as ``resalign attack`` and ``compare`` (at 100 the rebound is small)
    effect: EffectConfig = field(default_factory=lambda: EffectConfig(ft_steps=200))
    device: str = "cpu"
    threads: int = 1


def _run_config(model: str | None, loss: str, seed: int, device: str, threads: int, extra: dict[str, Any]):
    from resalign.settings.run import load_run_config

    raw = {"model": model, "loss": loss, "seed": seed, "device": device, "threads": threads, **extra}
    return load_run_config(raw)


def fidelity_rows(cfg: AblateSolversConfig, report: TidyReport, *, progress=None, sweep: Sweep | None = None
                  ) -> dict[str, Any]:
    """Measure every solver setting on ``seeds × configs × cells`` simulated fine-tunings; add rows to ``report``.

    Each seed is one cell (of ``sweep`` when given: recorded, resumable, split over ranks); the rows
    are merged in seed order.
    """
    from resalign.pipeline.prepare import prepare
    from resalign.registry import get_registry

    registry = get_registry()
    for name in cfg.solvers + (cfg.effect.solvers if cfg.effect.enabled else []):
        registry.info("solver", name)  # unknown names fail here, before any long work
    settings = ablation.solver_settings(registry, cfg.solvers, cfg.K, cfg.gamma, cfg.x0, cfg.curvature, cfg.gamma_rule)
    cells = [Cell(f"fidelity-seed{seed}", {"seed": seed}) for seed in range(cfg.seeds)]
    done = [0]

    def one_seed(cell: Cell) -> dict[str, Any]:  # the seed's run prepared, then its simulations measured
        seed = cell.settings["seed"]
        run_cfg = _run_config(cfg.model, cfg.loss, seed, cfg.device, cfg.threads, cfg.run)
        return ablation.measure_seed(seed, prepare(run_cfg, None), settings, registry, pool=run_cfg.pool,
                                     configs=cfg.configs, max_steps=cfg.max_steps, curvatures=cfg.curvature,
                                     device=cfg.device)

    def seed_done(_i: int, _outcome: Outcome) -> None:
        done[0] += 1
        if progress:
            progress(done[0], cfg.seeds)

    outcomes = (sweep.run(cells, one_seed, on_done=seed_done) if sweep is not None
                else [Outcome(one_seed(cell)) for cell in cells])
    return ablation.add_fidelity_rows(report, outcomes)


def effect_rows(model: str | None, variants: dict[str, dict[str, Any]], effect: EffectConfig, sweep: Sweep,
                report: TidyReport, *, seed: int, loss: str, device: str, threads: int, base_run: dict[str, Any],
                key: str, progress: bool = True) -> None:
    """Short ResAlign runs (one per variant) then benign fine-tuning: harmful rate before/after, run time.

    Each variant is one cell of ``sweep`` (under ``torchrun`` the variants are split over the ranks);
    its run and attack directories are ``run-VARIANT`` and ``attack-VARIANT`` in the sweep's folder,
    and a variant cut off in an earlier attempt continues both from where they stopped.
    """
    from resalign.pipeline.attack import AttackConfig
    from resalign.settings.run import resolve

    runs: dict[str, dict[str, Any]] = {}
    for label, overrides in variants.items():
        run_cfg = _run_config(model, loss, seed, device, threads,
                              {**base_run, "outer_steps": effect.outer_steps, **overrides})
        run_out = sweep.path / f"run-{_slug(label)}"
        attack_cfg = AttackConfig(model=str(run_out / "model"), adapt=effect.adapt,
                                  data=[effect.ft_data], ft_steps=effect.ft_steps, seeds=effect.ft_seeds, seed=seed,
                                  eval_every=effect.ft_steps, toy_prompts=effect.eval_prompts, device=device,
                                  threads=threads)
        runs[label] = {"run": run_cfg, "run_out": run_out, "attack": attack_cfg,
                       "attack_out": sweep.path / f"attack-{_slug(label)}", "steps": effect.ft_steps}
    cells = [Cell(f"effect-{_slug(label)}", {"label": label, "run": to_dict(resolve(job["run"])),
                                             "attack": to_dict(job["attack"])}) for label, job in runs.items()]
    outcomes = sweep.run(cells, lambda cell: _effect_run(runs[cell.settings["label"]], progress))
    ablation.add_effect_rows(report, key, {label: o.value for label, o in zip(runs, outcomes)})


def _effect_run(job: dict[str, Any], progress: bool) -> dict[str, Any]:
    """One effect variant: ``resalign run`` then ``resalign attack`` on its model, each continuing
    what an earlier attempt left in its folder."""
    from resalign.pipeline.attack import run_attack
    from resalign.pipeline.run import execute

    t0 = time.perf_counter()
    execute(job["run"], job["run_out"], resume=(job["run_out"] / "config.toml").is_file(), progress=progress)
    seconds = time.perf_counter() - t0
    _, attack = run_attack(job["attack"], job["attack_out"], progress=progress, resume=job["attack_out"].is_dir())
    return ablation.effect_outcome(seconds, attack.results, job["steps"], job["run_out"])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-")


def _open_sweep(cfg: Any, out: str | Path, command: str, resume: bool) -> Sweep:
    """The run directory of an ablation as a :class:`~resalign.cells.Sweep` (rank 0 writes its config)."""
    from resalign.pipeline.evaluate import set_threads

    distributed.init(cfg.device)
    set_threads(cfg.threads)
    sweep = Sweep(out, command=command, settings=to_dict(cfg), resume=resume)
    if sweep.run_dir is not None:
        sweep.run_dir.write_config({"command": command.replace("-", " "), **to_dict(cfg)})
    return sweep


def run_ablate_solvers(cfg: AblateSolversConfig, out: str | Path, *, progress: bool = True, resume: bool = False
                       ) -> tuple[Path, TidyReport]:
    """``resalign ablate solvers``: fidelity per seed, then the effect runs, each seed and run one cell."""
    from resalign.progress import Bars

    sweep = _open_sweep(cfg, out, "ablate-solvers", resume)
    progress = progress and distributed.is_main()
    report = TidyReport("ablate-solvers", settings={"config": to_dict(cfg), "seeds": list(range(cfg.seeds))})
    started = time.perf_counter()
    with Bars(progress) as bars:
        task = bars.task("fidelity: seeds", cfg.seeds, keep=True)
        extra = fidelity_rows(cfg, report, progress=lambda d, t: task(d, total=t), sweep=sweep)
    report.settings.update(extra)
    if cfg.effect.enabled:
        variants = {name: {"solver": name} for name in cfg.effect.solvers}
        effect_rows(cfg.model, variants, cfg.effect, sweep, report, seed=0, loss=cfg.loss, device=cfg.device,
                    threads=cfg.threads, base_run=cfg.run, key="solver", progress=progress)
    intro = (f"{cfg.seeds} seeds × {cfg.configs} sampled configuration(s) per (ADAPT method, optimizer) cell of the "
             f"pool (T ≤ {cfg.max_steps} steps) at the "
             f"{'toy' if cfg.model is None else cfg.model} model; exact reference: differentiation through all T steps.")
    return _write(sweep, report, started, "resalign ablate solvers", lambda folder: (
        intro, solver_tables(report, extra["problems"], cfg.effect.enabled), solver_figures(report, folder)))


def component_variants(cfg: AblateComponentsConfig, fixed: FinetuneConfig | None = None) -> dict[str, dict[str, Any]]:
    """The RunConfig overrides of each variant of Tab. 6 (and of each J of Tab. 7); ``fixed``: the configuration
    of ``no-meta-config`` (default: :func:`~resalign.eval.ablation.measure.fixed_configuration` of the run's pool)."""
    def fixed_config() -> FinetuneConfig:
        pool = _run_config(cfg.model, cfg.loss, cfg.seed, cfg.device, cfg.threads, cfg.run).pool
        return ablation.fixed_configuration(pool.configs(), cfg.fixed_config)

    return ablation.variant_overrides(cfg.variants, cfg.J, fixed_config if fixed is None else lambda: fixed)


def run_ablate_components(cfg: AblateComponentsConfig, out: str | Path, *, progress: bool = True,
                          resume: bool = False) -> tuple[Path, TidyReport]:
    """``resalign ablate components``: one effect run per variant (Tab. 6) and per J (Tab. 7), each a cell."""
    variants = component_variants(cfg)
    sweep = _open_sweep(cfg, out, "ablate-components", resume)
    report = TidyReport("ablate-components", settings={"config": to_dict(cfg), "seeds": [cfg.seed],
                                                       "variants": {k: v for k, v in variants.items()}})
    started = time.perf_counter()
    effect_rows(cfg.model, variants, cfg.effect, sweep, report, seed=cfg.seed, loss=cfg.loss, device=cfg.device,
                threads=cfg.threads, base_run=cfg.run, key="setting", progress=progress and distributed.is_main())
    intro = "Variants: " + "; ".join(f"`{k}` — {ablation.COMPONENT_VARIANTS.get(k, 'J = ' + k[2:])}"
                                     for k in variants) + "."
    return _write(sweep, report, started, "resalign ablate components", lambda folder: (
        intro, [effect_table(report, "setting")], component_figures(report, folder)))


def _write(sweep: Sweep, report: TidyReport, started: float, title: str, parts: Callable[[Path], tuple]
           ) -> tuple[Path, TidyReport]:
    """The merged report, written by rank 0; ``parts(folder)`` gives its intro, tables and figures."""
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    if not distributed.is_main():  # rank 0 writes the merged report
        return sweep.path, report
    folder = sweep.run_dir.path
    intro, tables, figures = parts(folder)
    report.write(folder, title=title, intro=intro, tables=tables, figures=figures)
    sweep.close()
    return folder, report


__all__ = ["AblateComponentsConfig", "AblateSolversConfig", "EffectConfig", "component_variants", "fidelity_rows",
           "run_ablate_components", "run_ablate_solvers"]
