"""``resalign ablate``: hypergradient solvers (Appendix E.1, Fig. 5) and method components (Tab. 6, 7).

``ablate solvers`` asks of every solver, on simulated fine-tunings sampled from the run's pool π(C):

1. fidelity — cosine similarity and relative error of its hypergradient against the exact one, the
   derivative of L_harm(θ_FT(θ)) through all T adaptation steps (the ``unrolled`` solver; T is capped by
   ``max_steps`` so that differentiating through the trajectory stays exact and affordable);
2. cost — wall time per hypergradient and peak memory, measured in the same process, one after the
   other on the same problem (the gradient graph that every HVP reuses is built once beforehand and
   timed on its own, ``hvp_setup_s``; a solver's λ_max power iterations count towards its own cost);
3. effect — the harmful rate after benign fine-tuning of short ResAlign runs that use that solver.

Iterative solvers of Eq. 6 (those whose ``Config`` has a ``K``) are swept over ``K`` and γ; any solver
registered by a plugin takes part by name.

``ablate components`` reproduces Tab. 6 — no hypergradient (β = 0), no meta-learning over
configurations (J = 1 and one fixed configuration), no meta-learning over data (one fixed fine-tuning
batch), the full method — and, with ``--J 1,3,5``, Tab. 7 (effect and training time against J).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resalign.components import FinetuneConfig
from resalign.config import to_dict
from resalign.core import seeds, tree
from resalign.core.fidelity import PeakMemory, measure
from resalign.core.problem import build_hypergrad_problem
from resalign.errors import ConfigError, SolverError
from resalign.eval.report import MarkdownTable, TidyReport, fmt_mean_sem
from resalign.rundir import RunDir

SOLVER_METRICS = ("cosine", "relative_error", "seconds", "peak_mb")


@dataclass
class EffectConfig:
    """Short ResAlign runs followed by benign fine-tuning (the ``effect`` figures)."""

    enabled: bool = True
    #: solvers given an effect run (``ablate solvers``); unrolled's, the slowest, only on request
    solvers: list[str] = field(default_factory=lambda: ["richardson", "first-order"])
    #: outer steps of each effect run: the toy preset's, so the runs unlearn as far as ``resalign run``
    outer_steps: int = 30
    ft_data: str = "toy-images:benign-a"
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
    seeds: int = 3
    configs: int = 2  # sampled configurations per seed
    max_steps: int = 10  # T cap of the sampled configurations (exact unrolling)
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
    seed: int = 0
    loss: str | None = None  # None: the run preset's harmful loss
    run: dict[str, Any] = field(default_factory=dict)
    effect: EffectConfig = field(default_factory=EffectConfig)
    device: str = "cpu"
    threads: int = 1


COMPONENT_VARIANTS = {
    "full": "the full method (Alg. 2)",
    "no-hypergradient": "β = 0: plain unlearning (Eq. 2), no hypergradient",
    "no-meta-config": "J = 1 and one fixed fine-tuning configuration",
    "no-meta-data": "one fixed fine-tuning batch for every simulation",
}


# --------------------------------------------------------------------------- shared set-up


def _run_config(model: str | None, loss: str, seed: int, device: str, threads: int, extra: dict[str, Any]):
    from resalign.pipeline.run import load_run_config

    raw = {"model": model, "loss": loss, "seed": seed, "device": device, "threads": threads, **extra}
    return load_run_config(raw)


def _solver_settings(registry, names: list[str], Ks: list[int], gammas: list[float],
                     x0s: Sequence[str] = ("zero",)) -> list[dict[str, Any]]:
    """Every (solver, K, γ, x_0) to measure; solvers without a ``K`` option are measured once, solvers
    without an ``x0`` option once per (K, γ)."""
    out = []
    for name in names:
        cls = registry.get("solver", name)
        fields = {f.name for f in dataclasses.fields(cls.Config)} if dataclasses.is_dataclass(
            getattr(cls, "Config", None)) else set()
        if name == "unrolled":
            continue  # the exact reference, measured separately
        if "K" in fields:
            for x0 in (x0s if "x0" in fields else (None,)):
                for gamma in gammas:
                    for K in Ks:
                        options = {"K": K} | ({"x0": x0} if x0 is not None else {})
                        out.append({"solver": name, "K": K, "gamma": gamma, "x0": x0, "options": options})
        else:
            out.append({"solver": name, "K": None, "gamma": None, "x0": None, "options": {}})
    return out


def _setting_label(s: dict[str, Any]) -> str:
    if s["K"] is None:
        return s["solver"]
    return f"{s['solver']} K={s['K']} γ={s['gamma']:g}" + (f" x0={s['x0']}" if s.get("x0") else "")


def _pool_for_fidelity(pool, max_steps: int) -> list[FinetuneConfig]:
    configs = [c for c in pool.configs() if c.steps <= max_steps]
    if not configs:
        raise ConfigError(f"--max-steps {max_steps}: no configuration of the pool has that few steps")
    return configs


# --------------------------------------------------------------------------- ablate solvers


def fidelity_rows(cfg: AblateSolversConfig, report: TidyReport, *, progress=None) -> dict[str, Any]:
    """Measure every solver setting on ``seeds × configs`` simulated fine-tunings; add rows to ``report``."""
    from resalign.core.meta import ResAlign
    from resalign.pipeline.run import prepare
    from resalign.registry import get_registry

    registry = get_registry()
    for name in cfg.solvers + (cfg.effect.solvers if cfg.effect.enabled else []):
        registry.info("solver", name)  # unknown names fail here, before any long work
    settings = _solver_settings(registry, cfg.solvers, cfg.K, cfg.gamma, cfg.x0)
    unrolled = registry.create("solver", "unrolled")
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def record(key: tuple, groups: tuple[str, ...], figures: dict[str, float]) -> None:
        for group in groups:
            for metric, v in figures.items():
                values[(*key, group)][metric].append(v)
    problems: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    total = cfg.seeds * cfg.configs
    done = 0
    for seed in range(cfg.seeds):
        run_cfg = _run_config(cfg.model, cfg.loss, seed, cfg.device, cfg.threads, cfg.run)
        prep = prepare(run_cfg, None)
        trainer = ResAlign(prep.ctx, prep.parameterization, harmful_loss=prep.components["loss"],
                           regularizer=prep.components["regularizer"], solver=unrolled, pool=run_cfg.pool,
                           data=prep.data, settings=prep.settings, registry=registry)
        theta = tree.detach(prep.parameterization.weights(trainer.theta))
        candidates = _pool_for_fidelity(run_cfg.pool, cfg.max_steps)
        attempts, kept = 0, 0
        while kept < cfg.configs:
            j, attempts = attempts, attempts + 1
            if attempts > 4 * cfg.configs:
                raise SolverError(f"seed {seed}: the exact hypergradient was non-finite for {len(skipped)} of "
                                  f"{attempts - 1} sampled configurations; lower the pool's learning rates")
            config = candidates[int(seeds.rng(seed, j, "ablate-config").integers(len(candidates)))]
            harm = prep.data.harmful.sample(prep.settings.harm_batch, seeds.generator(seed, j, "ablate-harm"))
            sim = trainer.simulation_data(j, 0, config, harm)
            problem, info = build_hypergrad_problem(
                prep.ctx, theta, config, sim, adapter=trainer._adapter(config),
                finetune_loss=trainer._ft_loss(config.finetune_loss), harmful_loss=prep.components["loss"],
                seed=seeds.derive(seed, j, "ablate-simulation"), gamma=1.0, with_unroll=True,
            )
            setup: dict[str, float] = {}
            try:
                with PeakMemory(cfg.device) as mem:
                    t0 = time.perf_counter()
                    exact = unrolled.solve(problem).hypergrad
                    t_exact = time.perf_counter() - t0
            except SolverError:  # the simulated fine-tuning itself diverged: no exact reference to compare with
                skipped.append({"seed": seed, "config": config.label()})
                continue
            kept += 1
            t0 = time.perf_counter()
            problem.hvp_ft(tree.zeros_like(problem.theta_ft))  # build the HVP graph once, for everyone
            hvp_setup = time.perf_counter() - t0
            shared: dict[str, Any] = {}
            if any(s["solver"] == "richardson" for s in settings):
                t0 = time.perf_counter()  # λ_max by power iteration, cached per outer step in a run
                registry.create("solver", "richardson").lambda_max(dataclasses.replace(problem, cache=shared))
                setup["lambda-max"] = time.perf_counter() - t0
            setup["hvp-setup"] = hvp_setup
            groups = ("all", config.optimizer)
            record(("unrolled", None, None, None), groups, {"cosine": 1.0, "relative_error": 0.0, "seconds": t_exact,
                                                       "peak_mb": mem.peak_bytes / 2**20})
            for name, secs in setup.items():
                record((name, None, None, None), groups, {"seconds": secs})
            for s in settings:
                solver = registry.create("solver", s["solver"], s["options"])
                gamma = s["gamma"] if s["gamma"] is not None else 1.0
                m = measure(solver, dataclasses.replace(problem, gamma=gamma, cache=dict(shared)), exact,
                            device=cfg.device)
                record((s["solver"], s["K"], s["gamma"], s["x0"]), groups,
                       {metric: getattr(m, metric) for metric in SOLVER_METRICS}
                       | ({"fallbacks": 1.0} if m.diagnostics.get("fallback") else {}))
            problems.append({"seed": seed, "config": config.label(), "exact_norm": tree.norm(exact),
                             "g_norm": tree.norm(problem.grad_harm), "unrolled_s": t_exact, "hvp_setup_s": hvp_setup,
                             **{k: info[k] for k in ("harm_ft", "delta_norm")}})
            done += 1
            if progress:
                progress(done, total)
    for (name, K, gamma, x0, group), metrics in values.items():
        label = _setting_label({"solver": name, "K": K, "gamma": gamma, "x0": x0})
        for metric, vals in metrics.items():
            if metric == "fallbacks":
                vals = [float(len(vals))]
            report.add(vals, solver=name, metric=metric, K=K, gamma=gamma, setting=label, stage="fidelity",
                       optimizer=group, **({"x0": x0} if x0 is not None else {}))
    return {"problems": problems, "skipped_divergent": skipped}


def effect_rows(model: str | None, variants: dict[str, dict[str, Any]], effect: EffectConfig, workdir: Path,
                report: TidyReport, *, seed: int, loss: str, device: str, threads: int, base_run: dict[str, Any],
                key: str, progress: bool = True) -> None:
    """Short ResAlign runs (one per variant) then benign fine-tuning: harmful rate before/after, run time."""
    from resalign.pipeline.attack import AttackConfig, run_attack
    from resalign.pipeline.run import execute

    for label, overrides in variants.items():
        run_cfg = _run_config(model, loss, seed, device, threads,
                              {**base_run, "outer_steps": effect.outer_steps, **overrides})
        t0 = time.perf_counter()
        run_dir = execute(run_cfg, workdir / f"run-{_slug(label)}", progress=progress)
        seconds = time.perf_counter() - t0
        report.add(seconds, **{key: label}, metric="train_seconds", stage="unlearning")
        _, attack = run_attack(
            AttackConfig(model=str(run_dir / "model"), adapt="full", data=[effect.ft_data], steps=effect.ft_steps,
                         seeds=effect.ft_seeds, seed=seed, eval_every=effect.ft_steps, toy_prompts=effect.eval_prompts,
                         device=device, threads=threads),
            workdir / f"attack-{_slug(label)}", progress=progress,
        )
        for row in attack.results:
            if row["metric"] in ("harmful_rate", "prompt_accuracy") and row.get("step") in (0, effect.ft_steps):
                report.add(row["values"], **{key: label}, metric=row["metric"], stage=row["stage"],
                           prompts=row.get("prompts"), finetune="full", dataset=row.get("dataset"), step=row["step"])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-")


def run_ablate_solvers(cfg: AblateSolversConfig, out: str | Path, *, progress: bool = True) -> tuple[Path, TidyReport]:
    from resalign.eval.ablation_plots import plot_fidelity_cost, plot_fidelity_vs_k
    from resalign.pipeline.evaluate import Bars, set_threads

    set_threads(cfg.threads)
    rd = RunDir(out, command="ablate-solvers")
    rd.write_config({"command": "ablate solvers", **to_dict(cfg)})
    report = TidyReport("ablate-solvers", settings={"config": to_dict(cfg), "seeds": list(range(cfg.seeds))})
    started = time.perf_counter()
    with Bars(progress) as bars:
        task = bars.task("fidelity: simulated fine-tunings", cfg.seeds * cfg.configs, keep=True)
        extra = fidelity_rows(cfg, report, progress=lambda d, t: task(d))
    report.settings.update(extra)
    if cfg.effect.enabled:
        variants = {name: {"solver": name} for name in cfg.effect.solvers}
        effect_rows(cfg.model, variants, cfg.effect, rd.path, report, seed=0, loss=cfg.loss, device=cfg.device,
                    threads=cfg.threads, base_run=cfg.run, key="solver", progress=progress)
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    figures = [
        ("Fidelity (cosine to the exact hypergradient) against K, mean ± SEM", "fidelity_vs_k.png"),
        ("Fidelity against cost per hypergradient", "fidelity_vs_cost.png"),
    ]
    plot_fidelity_vs_k(report.rows(stage="fidelity", metric="cosine"), rd.path / "fidelity_vs_k.png")
    plot_fidelity_cost(report.rows(stage="fidelity", metric="cosine", optimizer="all"),
                       report.rows(stage="fidelity", metric="seconds", optimizer="all"), rd.path / "fidelity_vs_cost.png")
    groups = list(dict.fromkeys(r["optimizer"] for r in report.rows(stage="fidelity")))
    tables = [solver_table(report, g) for g in groups]
    if cfg.effect.enabled:
        tables.append(effect_table(report, "solver"))
    intro = (f"{cfg.seeds} seeds × {cfg.configs} sampled configurations (T ≤ {cfg.max_steps} steps) at the "
             f"{'toy' if cfg.model is None else cfg.model} model; exact reference: differentiation through all T steps.")
    report.write(rd.path, title="resalign ablate solvers", intro=intro, tables=tables, figures=figures)
    return rd.path, report


def solver_table(report: TidyReport, optimizer: str = "all") -> MarkdownTable:
    which = "all sampled configurations" if optimizer == "all" else f"configurations with optimizer {optimizer}"
    table = MarkdownTable(f"Hypergradient fidelity and cost, {which} (mean ± SEM over seeds × configurations)",
                          ["setting", "cosine", "relative error", "seconds", "peak MB"])
    labels = list(dict.fromkeys(r["setting"] for r in report.rows(stage="fidelity", optimizer=optimizer)))
    for label in labels:
        cells = [label]
        for metric in SOLVER_METRICS:
            r = report.get(stage="fidelity", metric=metric, setting=label, optimizer=optimizer)
            cells.append(fmt_mean_sem(r["mean"], r["sem"], r["n"]) if r else "—")
        table.rows.append(cells)
    return table


def effect_table(report: TidyReport, key: str) -> MarkdownTable:
    table = MarkdownTable("Effect: harmful rate before and after benign full fine-tuning (mean ± SEM over fine-tuning seeds)",
                          [key, "prompts", "before FT", "after FT", "benign accuracy after FT", "unlearning s"])
    names = list(dict.fromkeys(r[key] for r in report.results if key in r and r.get("stage") in ("before_ft", "after_ft")))
    for name in names:
        for prompts in ("harmful", "implicit"):
            before = report.rows(**{key: name}, metric="harmful_rate", stage="before_ft", prompts=prompts)
            after = report.rows(**{key: name}, metric="harmful_rate", stage="after_ft", prompts=prompts)
            acc = report.rows(**{key: name}, metric="prompt_accuracy", stage="after_ft")
            secs = report.rows(**{key: name}, metric="train_seconds")
            if not before and not after:
                continue
            fmt = lambda rows: fmt_mean_sem(rows[0]["mean"], rows[0]["sem"], rows[0]["n"]) if rows else "—"  # noqa: E731
            table.rows.append([name, prompts, fmt(before), fmt(after), fmt(acc),
                               f"{secs[0]['mean']:.0f}" if secs else "—"])
    return table


# --------------------------------------------------------------------------- ablate components


def component_variants(cfg: AblateComponentsConfig, fixed: FinetuneConfig | None = None) -> dict[str, dict[str, Any]]:
    """The RunConfig overrides of each variant of Tab. 6 (and of each J of Tab. 7).

    ``fixed`` is the one configuration of ``no-meta-config`` (default: the first of the run's pool).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in cfg.variants:
        if name not in COMPONENT_VARIANTS:
            raise ConfigError(f"--variants: unknown variant {name!r} (expected: {', '.join(COMPONENT_VARIANTS)})")
        if name == "full":
            out[name] = {}
        elif name == "no-hypergradient":
            out[name] = {"beta": 0.0}
        elif name == "no-meta-config":
            if fixed is None:
                fixed = _run_config(cfg.model, cfg.loss, cfg.seed, cfg.device, cfg.threads, cfg.run).pool.configs()[0]
            out[name] = {"J": 1, "pool": {
                "lrs": [fixed.lr], "lrs_by_optimizer": {fixed.optimizer: [fixed.lr]}, "steps": [fixed.steps],
                "optimizers": [fixed.optimizer], "finetune_losses": [fixed.finetune_loss], "adapters": [fixed.adapter],
            }}
        elif name == "no-meta-data":
            out[name] = {"fixed_ft_data": True}
    for J in cfg.J:
        if J < 1:
            raise ConfigError(f"--J: every value must be >= 1, got {J}")
        out[f"J={J}"] = {"J": J}
    return out


def run_ablate_components(cfg: AblateComponentsConfig, out: str | Path, *, progress: bool = True
                          ) -> tuple[Path, TidyReport]:
    from resalign.pipeline.evaluate import set_threads

    set_threads(cfg.threads)
    variants = component_variants(cfg)
    rd = RunDir(out, command="ablate-components")
    rd.write_config({"command": "ablate components", **to_dict(cfg)})
    report = TidyReport("ablate-components", settings={"config": to_dict(cfg), "seeds": [cfg.seed],
                                                       "variants": {k: v for k, v in variants.items()}})
    started = time.perf_counter()
    effect_rows(cfg.model, variants, cfg.effect, rd.path, report, seed=cfg.seed, loss=cfg.loss, device=cfg.device,
                threads=cfg.threads, base_run=cfg.run, key="setting", progress=progress)
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    from resalign.eval.plots import plot_bars

    after = report.rows(metric="harmful_rate", stage="after_ft", prompts="harmful")
    plot_bars(after, rd.path / "components.png", group="setting", bar="stage",
              title="Harmful rate after benign fine-tuning (mean ± SEM)")
    intro = "Variants: " + "; ".join(f"`{k}` — {COMPONENT_VARIANTS.get(k, 'J = ' + k[2:])}" for k in variants) + "."
    report.write(rd.path, title="resalign ablate components", intro=intro, tables=[effect_table(report, "setting")],
                 figures=[("Harmful rate after benign fine-tuning per variant", "components.png")])
    return rd.path, report


__all__ = ["AblateComponentsConfig", "AblateSolversConfig", "EffectConfig", "component_variants", "fidelity_rows",
           "run_ablate_components", "run_ablate_solvers"]
