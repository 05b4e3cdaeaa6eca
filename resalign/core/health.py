"""What happened to the simulated fine-tunings of a run (Alg. 2 lines 6-8), from its step metrics.

A run's hypergradients are only as good as its simulations and solves. This summary counts the
simulations dropped (diverged, solver failure, outlier) with their reasons, the solves that halved
Richardson's ω or fell back to first-order, the median ω·λ_max (the step of the stiffest mode: near
1 the iteration uses the curvature, near 0 it barely moves from x_0), and how many hypergradients
were in effect first-order: a fallback, or a correction ‖x − g‖/‖g‖ below
:data:`FIRST_ORDER_CORRECTION`. When most were, Eq. 6 did not shape the run, and the summary says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

#: A hypergradient within this relative distance of g = ∇L_harm(θ_FT) counts as first-order.
FIRST_ORDER_CORRECTION = 0.05


def outlier_mask(reference: float, harm_ft: list[float], factor: float) -> list[bool]:
    """Which simulations of an outer step are outliers: |L_harm(θ_FT,j)| > factor · median of
    {|L_harm(θ)|} ∪ {|L_harm(θ_FT,j')|} (``reference`` = L_harm(θ)); ``factor`` 0 flags none."""
    if factor <= 0 or not harm_ft:
        return [False] * len(harm_ft)
    scale = float(np.median([abs(reference)] + [abs(h) for h in harm_ft]))
    return [abs(h) > factor * scale for h in harm_ft]


def simulation_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and shares over every simulation in ``rows`` (``metrics.jsonl`` of a run)."""
    sims = [(int(r.get("step", 0)), s) for r in rows for s in r.get("simulations", [])]
    kept = [s for _, s in sims if "dropped" not in s]
    solved = [s for s in kept if "correction" in s]
    halved = sum(1 for s in solved if s.get("halvings", 0) > 0)
    fallback = sum(1 for s in solved if s.get("fallback"))
    first_order = sum(1 for s in solved if s.get("fallback") or s["correction"] < FIRST_ORDER_CORRECTION)
    omega_lambda = [s["omega_lambda"] for s in solved if "omega_lambda" in s]
    n = len(sims)
    out: dict[str, Any] = {
        "simulations": n,
        "kept": len(kept),
        "dropped": n - len(kept),
        "dropped_share": (n - len(kept)) / n if n else 0.0,
        "dropped_list": [{"step": step, "config": s.get("config", ""), "reason": s["dropped"]}
                         for step, s in sims if "dropped" in s],
        "solved": len(solved),
        "halved": halved,
        "halved_share": halved / len(solved) if solved else 0.0,
        "fallback": fallback,
        "fallback_share": fallback / len(solved) if solved else 0.0,
        "first_order": first_order,
        "first_order_share": first_order / len(solved) if solved else 0.0,
        "median_omega_lambda": float(np.median(omega_lambda)) if omega_lambda else None,
    }
    out["warnings"] = summary_warnings(out)
    return out


def summary_warnings(summary: Mapping[str, Any]) -> list[str]:
    """Plain-language warnings for a :func:`simulation_summary`."""
    warnings = []
    if summary["simulations"] and summary["kept"] == 0:
        warnings.append("every simulated fine-tuning was dropped: the hypergradient term never entered the run "
                        "(check the pool's learning rates)")
    elif summary["dropped_share"] > 0.25:
        warnings.append(f"{summary['dropped']} of {summary['simulations']} simulated fine-tunings were dropped: "
                        "the pool holds unstable configurations")
    if summary["solved"] and summary["first_order_share"] > 0.5:
        warnings.append(f"{summary['first_order']} of {summary['solved']} hypergradients were in effect first-order "
                        f"(fallback, or within {FIRST_ORDER_CORRECTION:.0%} of ∇L_harm(θ_FT)): Eq. 6 barely shaped "
                        "this run")
    return warnings


def summary_markdown(summary: Mapping[str, Any]) -> list[str]:
    """``report.md`` lines for a :func:`simulation_summary`."""
    if not summary["simulations"]:
        return []
    s = summary
    lines = ["## Simulated fine-tunings", "",
             f"- {s['simulations']} simulations, {s['kept']} kept, {s['dropped']} dropped ({s['dropped_share']:.0%})."]
    if s["solved"]:
        mol = s["median_omega_lambda"]
        lines.append(f"- Richardson-type solves: {s['halved']} halved ω ({s['halved_share']:.0%}), {s['fallback']} fell "
                     f"back to first-order ({s['fallback_share']:.0%}); {s['first_order']} in effect first-order "
                     f"({s['first_order_share']:.0%})" + (f"; median ω·λ_max {mol:.3g}." if mol is not None else "."))
    for w in s["warnings"]:
        lines.append(f"- **Warning:** {w}.")
    if s["dropped_list"]:
        lines += ["", "| step | configuration | reason dropped |", "|---:|---|---|"]
        lines += [f"| {d['step']} | {d['config']} | {_cell(d['reason'])} |" for d in s["dropped_list"]]
    return lines + [""]


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell (its pipes escaped)."""
    return text.replace("|", "\\|")
