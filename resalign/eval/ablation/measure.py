"""The measurements of ``resalign ablate``: hypergradient fidelity (Appendix E.1, Fig. 5) and the method
variants of Tab. 6 and 7.

Fidelity: on simulated fine-tunings sampled in equal numbers from every (ADAPT method, optimizer) cell
of the run's pool π(C) (T ≤ ``max_steps``), every solver setting's hypergradient against the exact one
(the ``unrolled`` solver, differentiation through all T adaptation steps), with its wall time and peak
memory (:mod:`resalign.core.fidelity`); the figures are reported over all configurations and per cell.
Iterative solvers of Eq. 6 (those whose ``Config`` has a ``K``) are swept over ``K``, γ, x_0 and the
curvature operator; any solver registered by a plugin takes part by name.

Cost: wall time per hypergradient and peak memory, measured in the same process, one after the other
on the same problem (the gradient graph that every HVP reuses is built once beforehand and timed on
its own, ``hvp_setup_s``; a solver's λ_max power iterations count towards its own cost). Eq. 5 models
θ_FT as a proximal step in the full parameter space, which full-parameter SGD follows and Adam or a
LoRA adapter need not: hence the figures per (ADAPT method, optimizer) cell.

Effect: the harmful rate before and after benign fine-tuning of short runs (:func:`effect_results`).

Variants (``ablate components``): no hypergradient (β = 0), no meta-learning over configurations
(J = 1 and one fixed configuration), no meta-learning over data (one fixed fine-tuning batch), the
full method, and Tab. 7's J.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from resalign.components import FinetuneConfig
from resalign import seeds
from resalign.core import tree
from resalign.core.fidelity import PeakMemory, measure
from resalign.core.meta import MethodSettings
from resalign.core.problem import build_hypergrad_problem
from resalign.errors import ConfigError, SolverError
from resalign.eval.reports.tidy import TidyReport

SOLVER_METRICS = ("cosine", "relative_error", "seconds", "peak_mb")

COMPONENT_VARIANTS = {
    "full": "the full method (Alg. 2)",
    "no-hypergradient": "β = 0: plain unlearning (Eq. 2), no hypergradient",
    "no-meta-config": "J = 1 and one fixed fine-tuning configuration",
    "no-meta-data": "one fixed fine-tuning batch for every simulation",
}


def solver_settings(registry, names: list[str], Ks: list[int], gammas: list[float],
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


def setting_key(s: dict[str, Any]) -> tuple:
    gamma = s["gamma"] if s.get("rule", "fixed") == "fixed" or s["gamma"] is None else f"{s['gamma']:g}·T·lr"
    return s["solver"], s["K"], gamma, s["x0"], s.get("curvature")


def setting_label(s: dict[str, Any]) -> str:
    if s["K"] is None:
        return s["solver"] + (f" {s['curvature']}" if s.get("curvature") else "")
    gamma = s["gamma"] if isinstance(s["gamma"], str) else f"{s['gamma']:g}"
    return (f"{s['solver']} K={s['K']} γ={gamma}" + (f" x0={s['x0']}" if s.get("x0") else "")
            + (f" {s['curvature']}" if s.get("curvature") else ""))


def fidelity_cells(pool, max_steps: int) -> dict[tuple[str, str], list[FinetuneConfig]]:
    """The pool's configurations with T ≤ ``max_steps``, by (ADAPT method, optimizer) cell."""
    cells: dict[tuple[str, str], list[FinetuneConfig]] = {}
    for c in pool.configs():
        if c.steps <= max_steps:
            cells.setdefault((c.adapter, c.optimizer), []).append(c)
    if not cells:
        raise ConfigError(f"--max-steps {max_steps}: no configuration of the pool has that few steps")
    return dict(sorted(cells.items()))


def groups(config: FinetuneConfig) -> list[tuple[str, str]]:
    """The (optimizer, adapter) subsets a configuration's figures are reported in ("all" = any)."""
    return [("all", "all"), (config.optimizer, "all"), ("all", config.adapter), (config.optimizer, config.adapter)]


def measure_seed(seed: int, prep: Any, settings: list[dict[str, Any]], registry: Any, *, pool: Any, configs: int,
                 max_steps: int, curvatures: Sequence[str], device: str) -> dict[str, Any]:
    """One seed's simulated fine-tunings (``configs`` per cell of ``pool``, :func:`fidelity_cells`), every
    setting measured on each (:func:`measure_problem`): ``figures`` as [key, (optimizer, adapter) group,
    metric, value], ``problems``, ``skipped``.

    ``prep`` is the seed's prepared run (context, parameterization, data, components, settings); the
    simulations are those of its :class:`~resalign.core.meta.ResAlign` (data, adapters and losses), from
    θ at the original model; the first of ``curvatures`` builds each problem.
    """
    from resalign.core.meta import ResAlign

    unrolled = registry.create("solver", "unrolled")
    trainer = ResAlign(prep.ctx, prep.parameterization, harmful_loss=prep.components["loss"],
                       regularizer=prep.components["regularizer"], solver=unrolled, pool=pool,
                       data=prep.data, settings=prep.settings, registry=registry)
    theta = tree.detach(prep.parameterization.weights(trainer.theta))
    figures_out: list[list[Any]] = []
    problems: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    cells = fidelity_cells(pool, max_steps)
    j = 0  # simulation index within the seed: its data, noise and harmful batch
    for cell, candidates in cells.items():
        attempts, kept = 0, 0
        while kept < configs:
            attempts += 1
            if attempts > 4 * configs:
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
                problem, info = problem_with(curvatures[0])
                measured = measure_problem(problem, settings, unrolled, registry, device, problem_with, config=config)
            except SolverError:
                measured = None
            if measured is None:  # the simulated fine-tuning diverged: no exact reference to compare with
                skipped.append({"seed": seed, "config": config.label()})
                continue
            kept += 1
            figures, facts = measured
            for key, metrics in figures.items():
                for group in groups(config):
                    for metric, v in metrics.items():
                        figures_out.append([list(key), list(group), metric, float(v)])
            problems.append({"seed": seed, "config": config.label(), **facts,
                             **{k: info[k] for k in ("harm_ft", "delta_norm")}})
            if "lambda_max" in facts and config.optimizer == "sgd" and config.adapter == "full":
                # plain full-parameter SGD contracts every direction of ∇²L_FT only while lr · λ_max < 2
                problems[-1]["lr_lambda_max"] = config.lr * facts["lambda_max"]
    return {"figures": figures_out, "problems": problems, "skipped": skipped}


def measure_problem(problem, settings: list[dict[str, Any]], unrolled, registry, device: str,
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
            figures[setting_key(s)] = (
                {metric: getattr(m, metric) for metric in SOLVER_METRICS}
                | ({"fallbacks": 1.0} if m.diagnostics.get("fallback") else {})
                | ({"halved": 1.0} if m.diagnostics.get("halvings", 0) > 0 else {}))
    return figures, facts


def add_fidelity_rows(report: TidyReport, outcomes: Sequence[Any]) -> dict[str, Any]:
    """The seeds' outcomes (:func:`measure_seed`, in seed order) as report rows, one per setting, subset
    and metric (``fallbacks`` and ``halved``: how many solves fell back or halved their step); returns
    the report settings ``problems`` and ``skipped_divergent``."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    problems: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for outcome in outcomes:
        for key, group, metric, v in outcome.value["figures"]:
            values[(*key, *group)][metric].append(v)
        problems += outcome.value["problems"]
        skipped += outcome.value["skipped"]
    for (name, K, gamma, x0, curvature, optimizer, adapter), metrics in values.items():
        label = setting_label({"solver": name, "K": K, "gamma": gamma, "x0": x0, "curvature": curvature})
        extra = ({"x0": x0} if x0 is not None else {}) | ({"curvature": curvature} if curvature else {})
        for metric, vals in metrics.items():
            if metric in ("fallbacks", "halved"):
                vals = [float(len(vals))]
            report.add(vals, solver=name, metric=metric, K=K, gamma=gamma, setting=label, stage="fidelity",
                       optimizer=optimizer, adapter=adapter, **extra)
    return {"problems": problems, "skipped_divergent": skipped}


def effect_results(results: Sequence[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """The figures of an effect run in its ``resalign attack`` report: harmful rate and benign accuracy
    before (step 0) and after (step ``steps``) fine-tuning."""
    return [{k: row.get(k) for k in ("metric", "stage", "prompts", "dataset", "step", "values")} for row in results
            if row["metric"] in ("harmful_rate", "prompt_accuracy") and row.get("step") in (0, steps)]


def effect_outcome(seconds: float, attack_results: Sequence[dict[str, Any]], steps: int, run_dir: Any
                   ) -> dict[str, Any]:
    """The record of one effect run: its unlearning time, :func:`effect_results` and the validation
    curve of its run directory (:func:`resalign.core.heldout.run_curve`)."""
    from resalign.core.heldout import run_curve

    return {"seconds": seconds, "rows": effect_results(attack_results, steps), "validation": run_curve(run_dir)}


def add_effect_rows(report: TidyReport, key: str, outcomes: dict[str, dict[str, Any]]) -> None:
    """Each effect run's (variant label → ``seconds``, :func:`effect_results` ``rows`` and the run's
    ``validation`` curve, :func:`resalign.core.heldout.curve`) report rows, the variant under ``key``."""
    for label, out in outcomes.items():
        report.add(out["seconds"], **{key: label}, metric="train_seconds", stage="unlearning")
        for p in out.get("validation", []):
            report.add(p["harm_ft"], **{key: label}, metric="val_harm_ft", stage="validation", step=p["step"])
        for row in out["rows"]:
            report.add(row["values"], **{key: label}, metric=row["metric"], stage=row["stage"],
                       prompts=row.get("prompts"), finetune="full", dataset=row.get("dataset"), step=row["step"])


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


def variant_overrides(variants: Sequence[str], Js: Sequence[int], fixed: Callable[[], FinetuneConfig]
                      ) -> dict[str, dict[str, Any]]:
    """The RunConfig overrides of each variant of Tab. 6 (and of each J of Tab. 7); ``fixed()`` is the one
    configuration of ``no-meta-config`` (asked for only when that variant is)."""
    out: dict[str, dict[str, Any]] = {}
    for name in variants:
        if name not in COMPONENT_VARIANTS:
            raise ConfigError(f"--variants: unknown variant {name!r} (expected: {', '.join(COMPONENT_VARIANTS)})")
        if name == "full":
            out[name] = {}
        elif name == "no-hypergradient":
            out[name] = {"beta": 0.0}
        elif name == "no-meta-config":
            config = fixed()
            out[name] = {"J": 1, "pool": {
                "lrs": [config.lr], "lrs_by_optimizer": {config.optimizer: [config.lr]}, "steps": [config.steps],
                "optimizers": [config.optimizer], "finetune_losses": [config.finetune_loss],
                "adapters": [config.adapter],
            }}
        elif name == "no-meta-data":
            out[name] = {"fixed_ft_data": True}
    for J in Js:
        if J < 1:
            raise ConfigError(f"--J: every value must be >= 1, got {J}")
        out[f"J={J}"] = {"J": J}
    return out
