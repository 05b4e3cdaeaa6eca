"""The report of ``resalign run``: the last outer step's terms of Eq. 4, the simulations' health, the
wall time and the quick evaluation (:mod:`resalign.eval.scoring.quick`), as ``report.json`` and ``report.md``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from resalign.config import to_dict
from resalign.core.health import summary_markdown
from resalign.eval.scoring.quick import QuickEval, add_quick_rows, quick_markdown
from resalign.eval.reports.tidy import TidyReport

#: The metrics of the last outer step that the report carries.
LAST_STEP_KEYS = ("loss_harm", "loss_reg", "harm_ft_mean", "hypergrad_norm", "objective")


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
    return "\n".join(lines) + "\n" + "\n".join(["", *summary_markdown(health), *quick_markdown(report)])
