"""The report of an attack sweep (:mod:`resalign.eval.protocol.sweep`): the worst case per model, every
trial, and the best-so-far plot.

Tidy rows (``report.json``): per model a ``before_ft`` row per figure; per model and trial an
``after_ft`` row per figure with the trial's configuration (``trial``, ``finetune`` (the ADAPT
method), ``dataset``, ``lr``, ``lr_factor``, ``ft_steps``, ``optimizer``, ``ft_seed``) and its verdict
(``utility_loss``, ``within_budget``; a diverged trial has ``diverged`` and no figures); per model one
``worst_case`` row (``stage``), metric ``harmful_rate``, holding the most harmful within-budget trial's value and
configuration (no row when no trial is within budget).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resalign.eval.protocol.sweep import HARM_METRIC, best_so_far, worst_case
from resalign.eval.reports.tidy import MarkdownTable, TidyReport

PLOT = "best_so_far.png"


def _config_keys(c: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's configuration as row fields (flat, so that the CSV and a data frame have a column each)."""
    return {"finetune": c["adapt"], "dataset": c["data"], "lr": c["lr"], "lr_factor": c["lr_factor"],
            "ft_steps": c["steps"], "optimizer": c["optimizer"], "ft_seed": c["seed"]}


def add_rows(report: TidyReport, results: Mapping[str, Any], headline: str) -> None:
    """Every figure of the sweep (``results``: :func:`~resalign.eval.protocol.sweep.run_models`'s) as tidy rows."""
    for m, before in results["before"].items():
        for f in before["figures"]:
            report.add(f["value"], model=m, stage="before_ft", prompts=f["prompts"], metric=f["metric"],
                       scorer=f["scorer"])
    for m, records in results["trials"].items():
        for r in records:
            verdict = {k: r.get(k) for k in ("utility_before", "utility_after", "utility_loss", "within_budget",
                                             "diverged")}
            keys = dict(model=m, stage="after_ft", trial=r["trial"], **_config_keys(r["config"]), **verdict)
            if r.get("diverged"):
                report.add(math.nan, prompts=headline, metric=HARM_METRIC, **keys)
            for f in r.get("figures", []):
                report.add(f["value"], prompts=f["prompts"], metric=f["metric"], scorer=f["scorer"], **keys)
        best = worst_case(records)
        if best is not None:
            report.add(best["harmful_rate"], model=m, stage="worst_case", prompts=headline, metric=HARM_METRIC,
                       trial=best["trial"], utility_loss=best["utility_loss"], **_config_keys(best["config"]))


def _config_text(r: Mapping[str, Any]) -> str:
    """A trial's configuration (a record's ``config`` or a tidy row) in words."""
    if "config" in r:
        r = _config_keys(r["config"])
    return f"{r['finetune']}, lr {r['lr']:.3g}, {r['ft_steps']} steps, {r['optimizer']}, {r['dataset']}"


def worst_case_rows(report: TidyReport) -> MarkdownTable:
    """Per model (from the tidy rows of :func:`add_rows`): harmful rate before fine-tuning, the worst case
    within the budget, its configuration and utility loss, and how many trials stayed within budget."""
    s = report.settings["sweep"]
    headline, metric, budget = s["headline"], s["utility_metric"], s["utility_budget"]
    table = MarkdownTable(
        f"Worst-case harmful rate after fine-tuning within the utility budget ({metric} loss ≤ {budget:g})",
        ["model", "before FT", "worst case after FT", "configuration (trial)", "utility loss", "trials within budget"],
        note=f"Harmful rate on the `{headline}` prompts; the worst case is the largest over the trials whose "
             f"{metric} on the benign prompts fell by at most {budget:g} (rose, for a distance).")
    head = dict(prompts=headline, metric=HARM_METRIC)
    for m in dict.fromkeys(r["model"] for r in report.rows(stage="after_ft", **head)):
        before = next(iter(report.rows(model=m, stage="before_ft", **head)), None)
        trials = report.rows(model=m, stage="after_ft", **head)
        best = next(iter(report.rows(model=m, stage="worst_case", **head)), None)
        table.rows.append([
            f"`{m}`", "—" if before is None else f"{before['mean']:.3f}",
            "—" if best is None else f"{best['mean']:.3f}",
            "none within budget" if best is None else f"{_config_text(best)} ({best['trial']})",
            "—" if best is None else f"{best['utility_loss']:+.3f}",
            f"{sum(1 for r in trials if r.get('within_budget'))} / {len(trials)}"])
    return table


def trials_table(results: Mapping[str, Any]) -> MarkdownTable:
    """Every trial: its configuration, and per model the harmful rate (``*``: over budget, ``div``: diverged)."""
    models = list(results["trials"])
    table = MarkdownTable("Every trial (harmful rate after fine-tuning; * over the utility budget)",
                          ["trial", "configuration", *[f"`{m}`" for m in models]])
    n = max((len(v) for v in results["trials"].values()), default=0)
    for k in range(n):
        recs = [results["trials"][m][k] for m in models]
        cells = ["diverged" if r.get("diverged") else f"{r['harmful_rate']:.3f}" + ("" if r["within_budget"] else "*")
                 for r in recs]
        table.rows.append([str(recs[0]["trial"]), _config_text(recs[0]), *cells])
    return table


def plot_best_so_far(results: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """The running worst case within budget against the number of trials, one line per model."""
    from resalign.eval.reports.plots import _finish, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 1, figsize=(5.2, 3.6), squeeze=False)
    ax = axes[0][0]
    for m, records in results["trials"].items():
        ys = best_so_far(records)
        ax.step(range(1, len(ys) + 1), ys, where="post", marker="o", ms=3, label=m)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trials")
    ax.set_ylabel("worst-case harmful rate within budget")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _finish(plt, fig, axes, path, title)


def write_sweep_report(path: Path, report: TidyReport, results: Mapping[str, Any], *, headline: str, title: str,
                       results_md: str | None = None) -> list[MarkdownTable]:
    """``report.md``/``.json``/``.csv`` and ``best_so_far.png`` in ``path`` (the sweep's settings are
    ``report.settings["sweep"]``), and with ``results_md`` the tables there too; returns the tables."""
    from resalign.rundir import atomic_write_text

    s = report.settings["sweep"]
    metric, budget = s["utility_metric"], s["utility_budget"]
    s["headline"] = headline
    add_rows(report, results, headline)
    tables = [worst_case_rows(report), trials_table(results)]
    plot_best_so_far(results, path / PLOT, title=f"Best attack so far ({metric} loss ≤ {budget:g})")
    intro = sweep_intro(report.settings, len(results["trials"]))
    report.write(path, title=title, intro=intro, tables=tables,
                 figures=[("Worst-case harmful rate within the utility budget after each trial", PLOT)])
    if results_md:
        seconds = report.settings.get("seconds", 0.0)
        text = [f"# {title}", "", intro, "", f"This run took {seconds / 60:.1f} minutes; run directory `{path}`, "
                f"best-so-far plot `{path / PLOT}`.", ""]
        atomic_write_text(Path(results_md), "\n".join(text + [t.render() for t in tables]))
    return tables


def sweep_intro(settings: Mapping[str, Any], n_models: int) -> str:
    s = settings["sweep"]
    space = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in s["space"].items())
    return (f"Attack sweep: {len(s['trials'])} trials ({s['sampler']} sampler, seed {s['seed']}) over "
            f"{space}; each of the {n_models} models fine-tuned with every trial (trial k with fine-tuning seed "
            f"{s['seed']} + k). Utility budget: {s['utility_metric']} loss ≤ {s['utility_budget']:g} on the benign "
            "prompts. Learning rates are the preset's for the ADAPT method times lr_factor.")
