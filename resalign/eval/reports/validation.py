"""The validation meta-objective of ResAlign runs and their β = 0 twins in a sweep's report
(:mod:`resalign.core.heldout`): rows per outer step, the 30 % check per unlearning seed, the plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resalign.eval.reports.tidy import TidyReport


def validation_checks(report: TidyReport, run_dirs: Mapping[int, Mapping[str, str]],
                      pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The validation meta-objective of each ResAlign/twin pair (:mod:`resalign.core.heldout`), per
    unlearning seed: rows ``val_harm_ft`` over the outer steps, and at the last step ResAlign's mean
    L_harm(θ_FT^val) against its twin's (``below_30pct``: at least 30 % of |twin| lower)."""
    from resalign.core.heldout import run_curve

    out: dict[str, Any] = {}
    for ours, twin in pairs:
        per_seed = {}
        for u, dirs in run_dirs.items():
            curves = {m: run_curve(dirs[m]) for m in (ours, twin) if m in dirs}
            for m, pts in curves.items():
                for p in pts:
                    report.add(p["harm_ft"], model=m, metric="val_harm_ft", step=p["step"], stage="validation",
                               unlearn_seed=u)
            if len(curves) == 2 and all(curves.values()):
                a, b = curves[ours][-1]["harm_ft"], curves[twin][-1]["harm_ft"]
                per_seed[str(u)] = {"resalign": a, "twin": b, "relative": (a - b) / abs(b) if b else float("nan"),
                                    "below_30pct": bool(a <= b - 0.3 * abs(b)), "step": curves[ours][-1]["step"]}
        if per_seed:
            out[f"{ours}|{twin}"] = per_seed
    return out


def validation_figure(path: Path, report: TidyReport, key: str = "model") -> tuple[str, str] | None:
    """``validation.png``: mean L_harm(θ_FT^val) over the outer steps, one line per (method, unlearning seed)."""
    from resalign.eval.reports.plots import plot_validation

    rows = report.rows(metric="val_harm_ft")
    if not rows:
        return None
    curves: dict[str, list[dict[str, float]]] = {}
    for r in rows:
        name = r[key] if r.get("unlearn_seed") is None else f"{r[key]} (seed {r['unlearn_seed']})"
        curves.setdefault(name, []).append({"step": r["step"], "harm_ft": r["mean"]})
    plot_validation(curves, path / "validation.png", title="validation meta-objective", keys=("harm_ft",))
    return ("Validation meta-objective: mean L_harm after held-out simulated fine-tunings, per outer step",
            "validation.png")


def validation_lines(checks: Mapping[str, Any]) -> list[str]:
    """The report's lines for :func:`validation_checks` (under ``checks["validation"]``)."""
    lines = []
    for pair, per_seed in checks.get("validation", {}).items():
        ours, twin = pair.split("|")
        for u, e in per_seed.items():
            lines.append(f"- validation meta-objective, unlearning seed {u}, step {e['step']}: `{ours}` "
                         f"{e['resalign']:.4f} vs `{twin}` {e['twin']:.4f} ({100 * e['relative']:+.0f} %); "
                         f"at least 30 % below: {'yes' if e['below_30pct'] else 'no'}")
    return lines
