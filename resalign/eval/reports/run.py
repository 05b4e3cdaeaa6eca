"""The report of ``resalign run``: the last outer step's terms of Eq. 4, the simulations' health, the
wall time and the quick evaluation (:mod:`resalign.eval.scoring.quick`), as ``report.json`` and ``report.md``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from resalign.config import to_dict
from resalign.core.health import summary_markdown
from resalign.core.heldout import curve
from resalign.eval.reports.records import add_figures
from resalign.eval.reports.tidy import MarkdownTable, TidyReport, fmt_mean_sem

#: The metrics of the last outer step that the report carries.
LAST_STEP_KEYS = ("loss_harm", "loss_reg", "harm_ft_mean", "hypergrad_norm", "objective")
#: The quick evaluation's rows (:mod:`resalign.eval.scoring.quick`): their stage and models.
STAGE = "quick_eval"
#: Where ``report.json`` keeps the evaluation's settings (``settings.quick_eval`` is the run's prompt count).
SETTINGS_KEY = "quick_evaluation"
MODELS = ("base", "unlearned")


@dataclass
class QuickEval:
    """Figures per model (``base``, ``unlearned``) and the evaluation's settings, or why it was skipped."""

    figures: dict[str, list[Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def run_report(cfg: Any, rows: Sequence[dict[str, Any]], health: dict[str, Any], seconds: float,
               quick: QuickEval | None) -> TidyReport:
    """The run's tidy report: settings (with the simulations' health), last-step figures, wall time."""
    report = TidyReport("run", settings=to_dict(cfg))
    report.settings["simulations"] = health
    if rows:
        last = rows[-1]
        for key in LAST_STEP_KEYS:
            if key in last:
                report.add(last[key], model="resalign", metric=key, step=last["step"])
    for p in curve(rows):
        for key in ("harm", "harm_ft", "rebound", "ft_before", "ft_after"):
            report.add(p[key], model="resalign", metric=f"val_{key}", step=p["step"], stage="validation")
    report.add(seconds, model="resalign", metric="wall_time_s")
    if quick is not None:
        add_quick_rows(report, quick)
    return report


def run_markdown(cfg: Any, rows: Sequence[dict[str, Any]], stopped: bool, health: dict[str, Any],
                 report: dict[str, Any]) -> str:
    """``report.md``: the settings in a sentence, one table row per outer step, health, quick evaluation."""
    lines = [
        "# resalign run",
        "",
        f"loss `{cfg.loss}`, regularizer `{cfg.regularizer}`, solver `{cfg.solver}`, params `{cfg.params}`, "
        f"β = {cfg.beta}, α = {cfg.alpha}, J = {cfg.J}, γ = {cfg.gamma}, adapters {', '.join(cfg.pool.adapters)}, "
        f"{len(rows)} of {cfg.outer_steps} outer steps{' (stopped by a plugin)' if stopped else ''}.",
        "",
        "| step | L_harm | R | mean L_harm(θ_FT) | ‖h‖ | ‖G‖ | s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['loss_harm']:.4f} | {r['loss_reg']:.4f} | "
            f"{r.get('harm_ft_mean', float('nan')):.4f} | {r.get('hypergrad_norm', float('nan')):.3g} | "
            f"{r['grad_norm']:.3g} | {r['time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n" + "\n".join(["", *validation_markdown(curve(rows)), *summary_markdown(health),
                                                *quick_markdown(report)])


def validation_markdown(points: Sequence[dict[str, float]], plot: str = "validation.png") -> list[str]:
    """``report.md`` lines for the validation meta-objective (:mod:`resalign.core.heldout`)."""
    if not points:
        return []
    lines = ["## Validation meta-objective (held-out simulated fine-tunings)", "",
             "L_harm after each held-out simulation, on the same harmful pairs and noise as L_harm(θ); "
             "L_FT on the simulation's own data before and after it.", "",
             "| step | L_harm(θ) | mean L_harm(θ_FT^val) | rebound | L_FT before | L_FT after |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['step']} | {p['harm']:.4f} | {p['harm_ft']:.4f} | {p['rebound']:+.4f} | {p['ft_before']:.4f} | "
              f"{p['ft_after']:.4f} |" for p in points]
    return lines + ["", f"![validation meta-objective]({plot})", ""]


def add_quick_rows(report: TidyReport, q: QuickEval) -> None:
    """The figures as report rows (one seed each) and the evaluation under ``settings.quick_evaluation``."""
    report.settings[SETTINGS_KEY] = q.settings
    for model, figs in q.figures.items():
        add_figures(report, [figs], model=model, stage=STAGE)


def quick_table(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows (prompt set, metric, base, unlearned) of a run report's quick-evaluation results."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in results:
        if r.get("stage") == STAGE and r.get("model") in MODELS:
            cells.setdefault((r["prompts"], r["metric"]), {})[r["model"]] = fmt_mean_sem(r["mean"], r["sem"], r["n"])
    return [[p, m, by.get("base", "—"), by.get("unlearned", "—")] for (p, m), by in cells.items()]


def quick_markdown(report: Mapping[str, Any]) -> list[str]:
    """The quick evaluation's section of ``report.md`` (its table, or why it was skipped)."""
    settings = report.get("settings", {}).get(SETTINGS_KEY)
    if settings is None:
        return []
    if "skipped" in settings:
        return ["", f"Quick evaluation skipped: {settings['skipped']}"]
    table = MarkdownTable("Quick evaluation: base model against the unlearned one",
                          ["prompts", "metric", *MODELS], quick_table(report.get("results", [])),
                          note=f"One image per prompt, DDIM {settings['generation']['steps']} steps, seed {settings['seed']}.")
    return ["", table.render()]
