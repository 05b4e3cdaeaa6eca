"""The attack sweeps of ``attack --sweep`` and ``compare --sweep``: their plans, checked before any
work, and their runs over the models (:mod:`resalign.eval.protocol.sweep` holds the protocol)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from resalign import distributed
from resalign.errors import ConfigError
from resalign.eval.protocol.sweep import AttackSweep, Plan, SweepSettings, evaluator_fn, plan_sweep, run_models
from resalign.eval.reports.sweep import write_sweep_report


def metrics_of(sets: Sequence[Any]) -> list[str]:
    """The metrics the scorers of prompt sets ``sets`` measure (their ``metric``)."""
    from resalign.registry import get_registry

    registry = get_registry()
    return [str(getattr(registry.get("scorer", n), "metric", n)) for s in sets for n in s.scorers]


def sweep_settings(plan: Plan, lr_of: Callable[[str], float], seed: int) -> dict[str, Any]:
    """The report's ``settings.sweep``: the space, sampler, budget and every trial's configuration."""
    attack = AttackSweep(plan, [], data={}, lr_of=lr_of, headline="", seed=seed)
    return {"space": plan.space, "sampler": plan.sampler, "seed": seed, "utility_metric": plan.utility_metric,
            "utility_budget": plan.utility_budget, "trials": [attack.trial(k) for k in range(len(plan.trials))]}


def comparison_sweep(cfg: Any, preset: Any, datasets: Sequence[str], benign_sets: Sequence[Any],
                     image_size: int) -> Callable[..., dict[str, Any]]:
    """``compare --sweep``'s plan, checked before any work, as ``swept(cmp, sweep, bars=...)``
    (:func:`sweep_comparison`); ``cfg`` is a ``CompareConfig``, ``preset`` its
    :class:`~resalign.settings.presets.Preset`."""
    from resalign.eval.protocol.attack import load_pairs, preset_lr

    if cfg.unlearn_seeds > 1:
        raise ConfigError("--sweep attacks one unlearned model per method: leave --unlearn-seeds at 1")
    plan = plan_sweep(cfg, preset.sweep, seed=cfg.seed, datasets=datasets, utility_metrics=metrics_of(benign_sets))
    ap = preset.attack
    return functools.partial(
        sweep_comparison, plan=plan, seed=cfg.seed, lr_of=lambda a: cfg.lr or preset_lr(ap, a),
        load=lambda d: load_pairs(d, size=image_size, toy_size=ap.toy_data_size))


def attack_sweep(cfg: Any, preset: Any, image_size: int, benign_sets: Sequence[Any]) -> Callable[..., dict[str, Any]]:
    """``attack --sweep``'s plan, checked before any work, as ``swept(sweep, name, bundle, evaluators,
    headline, report, bars, started)``: the one model attacked with every trial and the report written
    (``started``: the ``time.perf_counter()`` of the command's start); ``cfg`` is an ``AttackConfig``."""
    from resalign.eval.protocol.attack import load_pairs, preset_lr

    for flag, on in (("--contaminate", cfg.contaminate is not None), ("--escape", bool(cfg.escape)),
                     ("--progressive", cfg.progressive)):
        if on:
            raise ConfigError(f"--sweep searches plain fine-tuning recipes; {flag} is a separate experiment")
    plan = plan_sweep(cfg, preset.sweep, seed=cfg.seed, datasets=cfg.data, utility_metrics=metrics_of(benign_sets))
    ap = preset.attack

    def lr_of(adapt: str) -> float:
        return cfg.lr or preset_lr(ap, adapt)

    def swept(sweep: Any, name: str, bundle: Any, evaluators: Sequence[Any], headline: str, report: Any,
              bars: Any, started: float) -> dict[str, Any]:
        data = {d: load_pairs(d, size=image_size, toy_size=ap.toy_data_size) for d in plan.space["data"]}
        attack = AttackSweep(plan, [name], data=data, lr_of=lr_of, headline=headline, seed=cfg.seed,
                             lora_rank=cfg.lora_rank, batch_size=cfg.batch_size)
        results = run_models(sweep, attack, lambda _m: bundle, evaluator_fn(evaluators, cfg.seed, bars), bars)
        report.settings["sweep"] = sweep_settings(plan, lr_of, cfg.seed)
        report.settings["seconds"] = round(time.perf_counter() - started, 1)
        if distributed.is_main():  # rank 0 writes the merged report
            write_sweep_report(sweep.path, report, results, headline=headline, title=f"resalign attack --sweep: {name}")
            sweep.close()
        return results

    return swept


def sweep_comparison(cmp: Any, sweep: Any, plan: Plan, *, lr_of: Callable[[str], float], load: Callable[[str], Any],
                     seed: int, bars: Any = None) -> dict[str, Any]:
    """``compare --sweep``: every compared model (of the first unlearning seed, at its matched checkpoint)
    swept with the same trials; ``load(spec)`` reads a dataset of the space; ``cmp`` is a
    :class:`~resalign.eval.protocol.comparison.Comparison` whose first evaluator measures the harmful
    and benign sets."""
    attack = AttackSweep(plan, cmp.methods, data={d: load(d) for d in plan.space["data"]}, lr_of=lr_of,
                         headline=cmp.harm_sets[0].name, seed=seed)
    u = cmp.unlearn_seeds[0]
    results = run_models(sweep, attack, lambda m: cmp.model(m, u).bundle, evaluator_fn([cmp.before_eval], seed, bars),
                         bars)
    cmp.report.settings["sweep"] = sweep_settings(plan, lr_of, seed)
    for m, records in results["trials"].items():
        cmp.add_time(f"sweep {m}", sum(r["seconds"] for r in records))
    return results


__all__ = ["SweepSettings", "attack_sweep", "comparison_sweep", "metrics_of", "sweep_comparison", "sweep_settings"]
