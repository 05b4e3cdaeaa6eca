"""``resalign ablate``: hypergradient solvers (Appendix E.1, Fig. 5) and method components (Tab. 6, 7).

``ablate solvers`` asks of every solver, on simulated fine-tunings sampled from the run's pool π(C):

1. fidelity — cosine similarity and relative error of its hypergradient against the exact one, the
   derivative of L_harm(θ_FT(θ)) through all T adaptation steps (the ``unrolled`` solver; T is capped by
   ``max_steps`` so that differentiating through the trajectory stays exact and affordable). The
   configurations are drawn in equal numbers from every (ADAPT method, optimizer) cell of the pool, and
   the figures are reported over all of them and per cell: Eq. 5 models θ_FT as a proximal step in the
   full parameter space, which full-parameter SGD follows and Adam or a LoRA adapter need not;
2. cost — wall time per hypergradient and peak memory, measured in the same process, one after the
   other on the same problem (the gradient graph that every HVP reuses is built once beforehand and
   timed on its own, ``hvp_setup_s``; a solver's λ_max power iterations count towards its own cost);
3. effect — the harmful rate after benign fine-tuning of short ResAlign runs that use that solver.

Iterative solvers of Eq. 6 (those whose ``Config`` has a ``K``) are swept over ``K`` and γ; any solver
registered by a plugin takes part by name.

``ablate components`` reproduces Tab. 6 — no hypergradient (β = 0), no meta-learning over
configurations (J = 1 and one fixed configuration), no meta-learning over data (one fixed fine-tuning
batch), the full method — and, with ``--J 1,3,5``, Tab. 7 (effect and training time against J).

Both are sweeps (:mod:`resalign.cells`): every fidelity seed and every effect run is a cell, recorded
when finished, skipped with ``--resume``, and split over the processes of a ``torchrun`` job.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resalign import distributed
from resalign.cells import Cell, Outcome, Sweep
from resalign.components import FinetuneConfig
from resalign.config import to_dict
from resalign.core import seeds, tree
from resalign.core.fidelity import PeakMemory, measure
from resalign.core.meta import MethodSettings
from resalign.core.problem import build_hypergrad_problem
from resalign.errors import ConfigError, SolverError
from resalign.eval.report import MarkdownTable, TidyReport, fmt_mean_sem

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
    #: the downstream fine-tuning method (any registered adapter)
    adapt: str = "full"
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
    #: sampled configurations per seed in each (ADAPT method, optimizer) cell of the pool
    configs: int = 1
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


COMPONENT_VARIANTS = {
    "full": "the full method (Alg. 2)",
    "no-hypergradient": "β = 0: plain unlearning (Eq. 2), no hypergradient",
    "no-meta-config": "J = 1 and one fixed fine-tuning configuration",
    "no-meta-data": "one fixed fine-tuning batch for every simulation",
}


# --------------------------------------------------------------------------- shared set-up


def _run_config(model: str | None, loss: str, seed: int, device: str, threads: int, extra: dict[str, Any]):
    from resalign.settings.run import load_run_config

    raw = {"model": model, "loss": loss, "seed": seed, "device": device, "threads": threads, **extra}
    return load_run_config(raw)


def _solver_settings(registry, names: list[str], Ks: list[int], gammas: list[float],
                     x0s: Sequence[str] = ("zero",), curvatures: Sequence[str] = ("hessian",),
                     rules: Sequence[str] = ("fixed",)) -> list[dict[str, Any]]:
    """Every (solver, K, γ, x_0, curvature) to measure; solvers without a ``K`` option (no linear solve,
    no curvature) are measured once, solvers without an ``x0`` option once per (K, γ, curvature)."""
    out = []
    for name in names:
        cls = registry.get("solver", name)
        fields = {f.name for f in dataclasses.fields(cls.Config)} if dataclasses.is_dataclass(
            getattr(cls, "Config", None)) else set()
        if name == "unrolled":
            continue  # the exact reference, measured separately
        if "K" in fields:
            for curvature in curvatures:
                for x0 in (x0s if "x0" in fields else (None,)):
                    for rule in rules:
                        for gamma in gammas:
                            for K in Ks:
                                options = {"K": K} | ({"x0": x0} if x0 is not None else {})
                                out.append({"solver": name, "K": K, "gamma": gamma, "x0": x0, "curvature": curvature,
                                            "rule": rule, "options": options})
        else:
            out.append({"solver": name, "K": None, "gamma": None, "x0": None, "curvature": None, "options": {}})
    return out


def _key(s: dict[str, Any]) -> tuple:
    gamma = s["gamma"] if s.get("rule", "fixed") == "fixed" or s["gamma"] is None else f"{s['gamma']:g}·T·lr"
    return s["solver"], s["K"], gamma, s["x0"], s.get("curvature")


def _setting_label(s: dict[str, Any]) -> str:
    if s["K"] is None:
        return s["solver"] + (f" {s['curvature']}" if s.get("curvature") else "")
    gamma = s["gamma"] if isinstance(s["gamma"], str) else f"{s['gamma']:g}"
    return (f"{s['solver']} K={s['K']} γ={gamma}" + (f" x0={s['x0']}" if s.get("x0") else "")
            + (f" {s['curvature']}" if s.get("curvature") else ""))


def _fidelity_cells(pool, max_steps: int) -> dict[tuple[str, str], list[FinetuneConfig]]:
    """The pool's configurations with T ≤ ``max_steps``, by (ADAPT method, optimizer) cell."""
    cells: dict[tuple[str, str], list[FinetuneConfig]] = {}
    for c in pool.configs():
        if c.steps <= max_steps:
            cells.setdefault((c.adapter, c.optimizer), []).append(c)
    if not cells:
        raise ConfigError(f"--max-steps {max_steps}: no configuration of the pool has that few steps")
    return dict(sorted(cells.items()))


def _groups(config: FinetuneConfig) -> list[tuple[str, str]]:
    """The (optimizer, adapter) subsets a configuration's figures are reported in ("all" = any)."""
    return [("all", "all"), (config.optimizer, "all"), ("all", config.adapter), (config.optimizer, config.adapter)]


# --------------------------------------------------------------------------- ablate solvers


def fidelity_rows(cfg: AblateSolversConfig, report: TidyReport, *, progress=None, sweep: Sweep | None = None
                  ) -> dict[str, Any]:
    """Measure every solver setting on ``seeds × configs × cells`` simulated fine-tunings; add rows to ``report``.

    Each seed is one cell (of ``sweep`` when given: recorded, resumable, split over ranks); the rows
    are merged in seed order.
    """
    from resalign.registry import get_registry

    registry = get_registry()
    for name in cfg.solvers + (cfg.effect.solvers if cfg.effect.enabled else []):
        registry.info("solver", name)  # unknown names fail here, before any long work
    settings = _solver_settings(registry, cfg.solvers, cfg.K, cfg.gamma, cfg.x0, cfg.curvature, cfg.gamma_rule)
    cells = [Cell(f"fidelity-seed{seed}", {"seed": seed}) for seed in range(cfg.seeds)]
    done = [0]

    def measure_seed(cell: Cell) -> dict[str, Any]:
        return _fidelity_seed(cfg, cell.settings["seed"], settings, registry)

    def seed_done(_i: int, _outcome: Outcome) -> None:
        done[0] += 1
        if progress:
            progress(done[0], cfg.seeds)

    outcomes = (sweep.run(cells, measure_seed, on_done=seed_done) if sweep is not None
                else [Outcome(measure_seed(cell)) for cell in cells])
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    problems: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for outcome in outcomes:
        for key, group, metric, v in outcome.value["figures"]:
            values[(*key, *group)][metric].append(v)
        problems += outcome.value["problems"]
        skipped += outcome.value["skipped"]
    for (name, K, gamma, x0, curvature, optimizer, adapter), metrics in values.items():
        label = _setting_label({"solver": name, "K": K, "gamma": gamma, "x0": x0, "curvature": curvature})
        extra = ({"x0": x0} if x0 is not None else {}) | ({"curvature": curvature} if curvature else {})
        for metric, vals in metrics.items():
            if metric in ("fallbacks", "halved"):
                vals = [float(len(vals))]
            report.add(vals, solver=name, metric=metric, K=K, gamma=gamma, setting=label, stage="fidelity",
                       optimizer=optimizer, adapter=adapter, **extra)
    return {"problems": problems, "skipped_divergent": skipped}


def _fidelity_seed(cfg: AblateSolversConfig, seed: int, settings: list[dict[str, Any]], registry) -> dict[str, Any]:
    """One seed's simulated fine-tunings (``configs`` per cell of the pool), every setting measured on
    each: ``figures`` as [key, (optimizer, adapter) group, metric, value], ``problems``, ``skipped``."""
    from resalign.core.meta import ResAlign
    from resalign.pipeline.prepare import prepare

    unrolled = registry.create("solver", "unrolled")
    figures_out: list[list[Any]] = []
    problems: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    run_cfg = _run_config(cfg.model, cfg.loss, seed, cfg.device, cfg.threads, cfg.run)
    prep = prepare(run_cfg, None)
    trainer = ResAlign(prep.ctx, prep.parameterization, harmful_loss=prep.components["loss"],
                       regularizer=prep.components["regularizer"], solver=unrolled, pool=run_cfg.pool,
                       data=prep.data, settings=prep.settings, registry=registry)
    theta = tree.detach(prep.parameterization.weights(trainer.theta))
    cells = _fidelity_cells(run_cfg.pool, cfg.max_steps)
    j = 0  # simulation index within the seed: its data, noise and harmful batch
    for cell, candidates in cells.items():
        attempts, kept = 0, 0
        while kept < cfg.configs:
            attempts += 1
            if attempts > 4 * cfg.configs:
                raise SolverError(f"seed {seed}: the exact hypergradient was non-finite for {attempts - 1 - kept} "
                                  f"sampled {'/'.join(cell)} configurations; lower the pool's learning rates")
            config = candidates[int(seeds.rng(seed, *cell, attempts, "ablate-config").integers(len(candidates)))]
            j += 1
            harm = prep.data.harmful.sample(prep.settings.harm_batch, seeds.generator(seed, j, "ablate-harm"))

            def problem_with(curvature: str, config=config, harm=harm, j=j):
                return build_hypergrad_problem(
                    prep.ctx, theta, config, trainer.simulation_data(j, 0, config, harm),
                    adapter=trainer.adapter(config), finetune_loss=trainer.finetune_loss(config),
                    harmful_loss=prep.components["loss"], seed=seeds.derive(seed, j, "ablate-simulation"),
                    gamma=1.0, curvature=curvature, with_unroll=True,
                    max_ft_loss_growth=prep.settings.max_ft_loss_growth,
                    curvature_samples=prep.settings.curvature_samples)

            try:
                problem, info = problem_with(cfg.curvature[0])
                measured = _measure_problem(problem, settings, unrolled, registry, cfg.device, problem_with,
                                            config=config)
            except SolverError:
                measured = None
            if measured is None:  # the simulated fine-tuning diverged: no exact reference to compare with
                skipped.append({"seed": seed, "config": config.label()})
                continue
            kept += 1
            figures, facts = measured
            for key, metrics in figures.items():
                for group in _groups(config):
                    for metric, v in metrics.items():
                        figures_out.append([list(key), list(group), metric, float(v)])
            problems.append({"seed": seed, "config": config.label(), **facts,
                             **{k: info[k] for k in ("harm_ft", "delta_norm")}})
            if "lambda_max" in facts and config.optimizer == "sgd" and config.adapter == "full":
                # plain full-parameter SGD contracts every direction of ∇²L_FT only while lr · λ_max < 2
                problems[-1]["lr_lambda_max"] = config.lr * facts["lambda_max"]
    return {"figures": figures_out, "problems": problems, "skipped": skipped}


def _measure_problem(problem, settings: list[dict[str, Any]], unrolled, registry, device: str,
                     problem_with=None, config: FinetuneConfig | None = None
                     ) -> tuple[dict[tuple, dict[str, float]], dict[str, Any]] | None:
    """Every solver setting on one problem against its exact hypergradient (None when that diverged).

    Settings with another curvature than ``problem``'s are measured on ``problem_with(curvature)``, the
    same simulation (same θ_FT, g and exact hypergradient) with that curvature operator. Returns the
    figures per (solver, K, γ, x_0, curvature) and facts about the problem: ‖g‖, ‖exact‖, the unrolled
    solve's and the HVP set-up's seconds, and λ_max of the first curvature at θ_FT (power iterations,
    a lower bound) when a Richardson setting computed it.
    """
    try:
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            exact = unrolled.solve(problem).hypergrad
            t_exact = time.perf_counter() - t0
    except SolverError:
        return None
    t0 = time.perf_counter()
    problem.hvp_ft(tree.zeros_like(problem.theta_ft))  # build the HVP graph once, for everyone
    hvp_setup = time.perf_counter() - t0
    figures: dict[tuple, dict[str, float]] = {
        ("unrolled", None, None, None, None): {"cosine": 1.0, "relative_error": 0.0, "seconds": t_exact,
                                               "peak_mb": mem.peak_bytes / 2**20},
        ("hvp-setup", None, None, None, None): {"seconds": hvp_setup},
    }
    facts = {"exact_norm": tree.norm(exact), "g_norm": tree.norm(problem.grad_harm), "unrolled_s": t_exact,
             "hvp_setup_s": hvp_setup}
    curvatures = list(dict.fromkeys(s.get("curvature") or problem.curvature for s in settings))
    for curvature in curvatures or [problem.curvature]:
        p = problem if curvature == problem.curvature else problem_with(curvature)[0]
        shared: dict[str, Any] = {}
        if any(s["solver"] == "richardson" and s.get("curvature") == curvature for s in settings):
            t0 = time.perf_counter()  # λ_max by power iteration, cached per outer step in a run
            lam, _ = registry.create("solver", "richardson").lambda_max(dataclasses.replace(p, cache=shared))
            figures[("lambda-max", None, None, None, curvature)] = {"seconds": time.perf_counter() - t0}
            facts.setdefault("lambda_max", lam)
            facts[f"lambda_max/{curvature}"] = lam
        for s in settings:
            if (s.get("curvature") or problem.curvature) != curvature:
                continue
            solver = registry.create("solver", s["solver"], s["options"])
            gamma = s["gamma"] if s["gamma"] is not None else 1.0
            if config is not None:  # the simulation's γ under the setting's rule, as a run would set it
                gamma = MethodSettings(gamma=gamma, gamma_rule=s.get("rule", "fixed")).proximity(config)
            m = measure(solver, dataclasses.replace(p, gamma=gamma, cache=dict(shared)), exact, device=device)
            figures[_key(s)] = (
                {metric: getattr(m, metric) for metric in SOLVER_METRICS}
                | ({"fallbacks": 1.0} if m.diagnostics.get("fallback") else {})
                | ({"halved": 1.0} if m.diagnostics.get("halvings", 0) > 0 else {}))
    return figures, facts


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
                                  data=[effect.ft_data], steps=effect.ft_steps, seeds=effect.ft_seeds, seed=seed,
                                  eval_every=effect.ft_steps, toy_prompts=effect.eval_prompts, device=device,
                                  threads=threads)
        runs[label] = {"run": run_cfg, "run_out": run_out, "attack": attack_cfg,
                       "attack_out": sweep.path / f"attack-{_slug(label)}", "steps": effect.ft_steps}
    cells = [Cell(f"effect-{_slug(label)}", {"label": label, "run": to_dict(resolve(job["run"])),
                                             "attack": to_dict(job["attack"])}) for label, job in runs.items()]
    outcomes = sweep.run(cells, lambda cell: _effect_run(runs[cell.settings["label"]], progress))
    for label, out in zip(runs, (o.value for o in outcomes)):
        report.add(out["seconds"], **{key: label}, metric="train_seconds", stage="unlearning")
        for row in out["rows"]:
            report.add(row["values"], **{key: label}, metric=row["metric"], stage=row["stage"],
                       prompts=row.get("prompts"), finetune="full", dataset=row.get("dataset"), step=row["step"])


def _effect_run(job: dict[str, Any], progress: bool) -> dict[str, Any]:
    """One effect variant: ``resalign run`` then ``resalign attack`` on its model, each continuing
    what an earlier attempt left in its folder."""
    from resalign.pipeline.attack import run_attack
    from resalign.pipeline.run import execute

    t0 = time.perf_counter()
    execute(job["run"], job["run_out"], resume=(job["run_out"] / "config.toml").is_file(), progress=progress)
    seconds = time.perf_counter() - t0
    _, attack = run_attack(job["attack"], job["attack_out"], progress=progress, resume=job["attack_out"].is_dir())
    rows = [{k: row.get(k) for k in ("metric", "stage", "prompts", "dataset", "step", "values")}
            for row in attack.results
            if row["metric"] in ("harmful_rate", "prompt_accuracy") and row.get("step") in (0, job["steps"])]
    return {"seconds": seconds, "rows": rows}


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
    from resalign.eval.ablation_plots import plot_fidelity_cost, plot_fidelity_vs_k
    from resalign.pipeline.evaluate import Bars

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
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    if not distributed.is_main():  # rank 0 writes the merged report
        return sweep.path, report
    rd = sweep.run_dir
    figures = [
        ("Fidelity (cosine to the exact hypergradient) against K, mean ± SEM", "fidelity_vs_k.png"),
        ("Fidelity against cost per hypergradient", "fidelity_vs_cost.png"),
    ]
    plot_fidelity_vs_k(report.rows(stage="fidelity", metric="cosine"), rd.path / "fidelity_vs_k.png")
    everything = {"optimizer": "all", "adapter": "all"}
    plot_fidelity_cost(report.rows(stage="fidelity", metric="cosine", **everything),
                       report.rows(stage="fidelity", metric="seconds", **everything), rd.path / "fidelity_vs_cost.png")
    tables = [cosine_by_subset_table(report), solver_table(report), problems_table(extra["problems"])]
    if cfg.effect.enabled:
        tables.append(effect_table(report, "solver"))
    intro = (f"{cfg.seeds} seeds × {cfg.configs} sampled configuration(s) per (ADAPT method, optimizer) cell of the "
             f"pool (T ≤ {cfg.max_steps} steps) at the "
             f"{'toy' if cfg.model is None else cfg.model} model; exact reference: differentiation through all T steps.")
    report.write(rd.path, title="resalign ablate solvers", intro=intro, tables=tables, figures=figures)
    sweep.close()
    return rd.path, report


def solver_table(report: TidyReport, optimizer: str = "all", adapter: str = "all") -> MarkdownTable:
    which = _subset_name(optimizer, adapter)
    table = MarkdownTable(f"Hypergradient fidelity and cost, {which} (mean ± SEM over seeds × configurations)",
                          ["setting", "cosine", "relative error", "seconds", "peak MB"])
    where = {"stage": "fidelity", "optimizer": optimizer, "adapter": adapter}
    labels = list(dict.fromkeys(r["setting"] for r in report.rows(**where)))
    for label in labels:
        cells = [label]
        for metric in SOLVER_METRICS:
            r = report.get(**where, metric=metric, setting=label)
            cells.append(fmt_mean_sem(r["mean"], r["sem"], r["n"]) if r else "—")
        table.rows.append(cells)
    return table


def problems_table(problems: list[dict[str, Any]]) -> MarkdownTable:
    """One row per simulated fine-tuning: ‖g‖, ‖exact‖, λ_max and, for full-parameter SGD, lr·λ_max."""
    table = MarkdownTable("Sampled configurations (‖g‖ = first-order, ‖exact‖ = unrolled, λ_max of ∇²L_FT at θ_FT "
                          "by power iteration; full-parameter SGD with lr·λ_max ≥ 2 no longer contracts its top "
                          "direction)",
                          ["seed", "configuration", "‖g‖", "‖exact‖", "λ_max", "lr·λ_max"])
    for p in problems:
        lam, lr_lam = p.get("lambda_max"), p.get("lr_lambda_max")
        table.rows.append([str(p["seed"]), p["config"], f"{p['g_norm']:.3g}", f"{p['exact_norm']:.3g}",
                           f"{lam:.3g}" if lam is not None else "—", f"{lr_lam:.2f}" if lr_lam is not None else "—"])
    return table


def _subset_name(optimizer: str, adapter: str) -> str:
    if optimizer == adapter == "all":
        return "all sampled configurations"
    return "configurations " + " and ".join(
        part for part in (f"with ADAPT {adapter}" if adapter != "all" else "",
                          f"with optimizer {optimizer}" if optimizer != "all" else "") if part)


def fidelity_subsets(report: TidyReport) -> list[tuple[str, str]]:
    """(optimizer, adapter) subsets with fidelity rows: all, then every cell, then per optimizer / adapter."""
    found = list(dict.fromkeys((r["optimizer"], r["adapter"]) for r in report.rows(stage="fidelity", metric="cosine")))
    rank = lambda key: (key != ("all", "all"), "all" in key, key[1], key[0])  # noqa: E731
    return sorted(found, key=rank)


def cosine_by_subset_table(report: TidyReport) -> MarkdownTable:
    """Cosine to the exact hypergradient of every setting (rows) in every subset of configurations (columns)."""
    subsets = fidelity_subsets(report)
    head = ["all" if s == ("all", "all") else "/".join(p for p in (s[1], s[0]) if p != "all") for s in subsets]
    table = MarkdownTable("Cosine to the exact hypergradient by ADAPT method / optimizer of the configuration "
                          "(mean ± SEM, n configurations)", ["setting", *head])
    labels = list(dict.fromkeys(r["setting"] for r in report.rows(stage="fidelity", metric="cosine")))
    for label in labels:
        cells = [label]
        for optimizer, adapter in subsets:
            r = report.get(stage="fidelity", metric="cosine", setting=label, optimizer=optimizer, adapter=adapter)
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


def fixed_configuration(configs: list[FinetuneConfig], label: str | None = None) -> FinetuneConfig:
    """The one configuration of ``no-meta-config``: the pool's configuration labelled ``label``, or by
    default its first full-parameter Adam configuration (the kind of fine-tuning the effect's benign
    fine-tuning runs, AdamW on every weight), else its first configuration.

    The pool's first configuration is no neutral default: on the toy world it is full-parameter SGD at
    lr 0.1, whose simulated fine-tuning diverges (its loss rises from 0.013 to 3.3 in 5 steps).
    """
    if label:
        for c in configs:
            if c.label() == label:
                return c
        shown = ", ".join(c.label() for c in configs[:6]) + (", ..." if len(configs) > 6 else "")
        raise ConfigError(f"--fixed-config {label!r}: not a configuration of the pool (expected a label such as "
                          f"{shown})")
    for c in configs:
        if c.adapter == "full" and c.optimizer == "adam":
            return c
    return configs[0]


def component_variants(cfg: AblateComponentsConfig, fixed: FinetuneConfig | None = None) -> dict[str, dict[str, Any]]:
    """The RunConfig overrides of each variant of Tab. 6 (and of each J of Tab. 7).

    ``fixed`` is the one configuration of ``no-meta-config`` (default: :func:`fixed_configuration` of
    the run's pool and ``cfg.fixed_config``).
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
                pool = _run_config(cfg.model, cfg.loss, cfg.seed, cfg.device, cfg.threads, cfg.run).pool
                fixed = fixed_configuration(pool.configs(), cfg.fixed_config)
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
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    if not distributed.is_main():  # rank 0 writes the merged report
        return sweep.path, report
    rd = sweep.run_dir
    from resalign.eval.plots import plot_bars

    rates = [r for r in report.rows(metric="harmful_rate", prompts="harmful") if r["stage"] in ("before_ft", "after_ft")]
    plot_bars(rates, rd.path / "components.png", group="setting", bar="stage", bars_order=["before_ft", "after_ft"],
              title="Harmful rate before and after benign fine-tuning (mean ± SEM)")
    intro = "Variants: " + "; ".join(f"`{k}` — {COMPONENT_VARIANTS.get(k, 'J = ' + k[2:])}" for k in variants) + "."
    report.write(rd.path, title="resalign ablate components", intro=intro, tables=[effect_table(report, "setting")],
                 figures=[("Harmful rate before and after benign fine-tuning per variant", "components.png")])
    sweep.close()
    return rd.path, report


__all__ = ["AblateComponentsConfig", "AblateSolversConfig", "EffectConfig", "component_variants", "fidelity_rows",
           "run_ablate_components", "run_ablate_solvers"]
