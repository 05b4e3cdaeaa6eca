"""What the cells of ``attack`` / ``compare`` / ``ablate`` record (:mod:`resalign.cells`): figures and
sample images, in JSON and arrays, read back as the objects the reports are built from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from resalign.components import ScoreResult
from resalign.eval.reports.tidy import TidyReport


@dataclass
class Figure:
    """One scorer's figure on one prompt set's images."""

    prompts: str
    metric: str
    scorer: str
    value: float
    result: ScoreResult


def figures_value(figs: Sequence[Figure]) -> list[dict[str, Any]]:
    """The report-facing part of each figure (prompt set, metric, scorer, value)."""
    return [{"prompts": f.prompts, "metric": f.metric, "scorer": f.scorer, "value": float(f.value)} for f in figs]


def figures_of(rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
    """Figures back from :func:`figures_value` (their score result holds the figure only)."""
    return [Figure(r["prompts"], r["metric"], r["scorer"], r["value"], ScoreResult(r["metric"], r["value"]))
            for r in rows]


def samples_arrays(samples: Mapping[str, np.ndarray]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Sample grids as (names in order, arrays keyed ``sample-i``)."""
    names = list(samples)
    return names, {f"sample-{i}": np.asarray(samples[n]) for i, n in enumerate(names)}


def samples_of(names: Sequence[str], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`samples_arrays`, in the recorded order."""
    return {n: arrays[f"sample-{i}"] for i, n in enumerate(names)}


def attack_records(outcomes: Sequence[Any]) -> tuple[dict[int, list[list[Figure]]], dict[str, list[list[Figure]]],
                                                     dict[str, np.ndarray]]:
    """An attack's seed cells, in seed order: figures per step along fine-tuning, benign figures per
    stage (``before_ft``, ``after_ft``) and the sample grids, each list one entry per seed."""
    curves: dict[int, list[list[Figure]]] = {}
    utility: dict[str, list[list[Figure]]] = {"before_ft": [], "after_ft": []}
    samples: dict[str, np.ndarray] = {}
    for outcome in outcomes:
        for step, figs in outcome.value["curves"].items():
            curves.setdefault(int(step), []).append(figures_of(figs))
        for stage, figs in outcome.value["utility"].items():
            utility[stage].append(figures_of(figs))
        samples.update(samples_of(outcome.value["samples"], outcome.arrays))
    return curves, utility, samples


def add_figures(report: TidyReport, per_seed: Sequence[Sequence[Figure]], **keys: Any) -> None:
    """One report row per (prompt set, metric, scorer), its values over seeds."""
    order: dict[tuple[str, str, str], list[float]] = {}
    for figs in per_seed:
        for f in figs:
            order.setdefault((f.prompts, f.metric, f.scorer), []).append(f.value)
    for (prompts, metric, scorer), values in order.items():
        report.add(values, prompts=prompts, metric=metric, scorer=scorer, **keys)
