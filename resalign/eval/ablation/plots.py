"""Plots of ``resalign ablate``: fidelity against K, fidelity against cost, and the variants' harmful rates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resalign.eval.reports.plots import _pyplot, _save, line_with_band


def plot_fidelity_vs_k(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Cosine to the exact hypergradient against K, one line per (solver, γ, x_0), solvers without K as
    dashed levels; one panel for all configurations and one per (ADAPT method, optimizer) cell."""
    plt = _pyplot()
    panels: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        key = (r.get("optimizer", "all"), r.get("adapter", "all"))
        if key == ("all", "all") or "all" not in key:
            panels.setdefault(key, []).append(r)
    order = sorted(panels, key=lambda k: (k != ("all", "all"), k[1], k[0]))
    if len(order) == 2 and ("all", "all") in order:  # one cell: its panel is the "all" panel
        order = [k for k in order if k != ("all", "all")]
    cols = min(3, len(order))
    nrows = -(-len(order) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False, sharey=True,
                             layout="constrained")
    for ax in axes.flat[len(order):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, order):
        pts = panels[key]
        lines: dict[str, list[Mapping[str, Any]]] = {}
        for r in pts:
            if r.get("K") is not None:  # one line per setting but K (γ, x_0, curvature)
                lines.setdefault(r["setting"].replace(f" K={r['K']}", ""), []).append(r)
        for label, line in lines.items():
            line_with_band(ax, line, "K", label)
        if lines:
            for r in pts:
                if r.get("K") is None and r["solver"] not in ("hvp-setup", "lambda-max", "unrolled"):
                    ax.axhline(r["mean"], linestyle="--", linewidth=1, label=r["solver"],
                               color="grey" if r["solver"] == "first-order" else None)
        n = max((r.get("n", 0) for r in pts), default=0)
        ax.set_title("all configurations" if key == ("all", "all") else f"{key[1]} / {key[0]}", fontsize=9)
        ax.text(0.02, 0.03, f"n = {n}", transform=ax.transAxes, fontsize=7)
        ax.set_xlabel("K (HVPs / iterations)")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("cosine to exact hypergradient")
    axes.flat[0].legend(fontsize=6, loc="best")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_fidelity_cost(cos_rows: Sequence[Mapping[str, Any]], sec_rows: Sequence[Mapping[str, Any]],
                       path: str | Path) -> Path:
    """One point per solver setting: seconds per hypergradient (x, log) against cosine (y)."""
    plt = _pyplot()
    secs = {r["setting"]: r["mean"] for r in sec_rows if "setting" in r}
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for r in cos_rows:
        label = r.get("setting", r["solver"])
        if label not in secs:
            continue
        ax.errorbar(secs[label], r["mean"], yerr=r.get("sem") or 0.0, fmt="o", ms=4, capsize=2)
        ax.annotate(label, (secs[label], r["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per hypergradient")
    ax.set_ylabel("cosine to exact hypergradient")
    ax.grid(alpha=0.3)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def solver_figures(report: Any, folder: Path) -> list[tuple[str, str]]:
    """``ablate solvers``' plots in ``folder``, as (caption, file name) for the report."""
    plot_fidelity_vs_k(report.rows(stage="fidelity", metric="cosine"), folder / "fidelity_vs_k.png")
    everything = {"optimizer": "all", "adapter": "all"}
    plot_fidelity_cost(report.rows(stage="fidelity", metric="cosine", **everything),
                       report.rows(stage="fidelity", metric="seconds", **everything), folder / "fidelity_vs_cost.png")
    return [("Fidelity (cosine to the exact hypergradient) against K, mean ± SEM", "fidelity_vs_k.png"),
            ("Fidelity against cost per hypergradient", "fidelity_vs_cost.png")]


def component_figures(report: Any, folder: Path) -> list[tuple[str, str]]:
    """``ablate components``' plot in ``folder``: harmful rate before and after fine-tuning per variant."""
    from resalign.eval.reports.plots import plot_bars

    rates = [r for r in report.rows(metric="harmful_rate", prompts="harmful") if r["stage"] in ("before_ft", "after_ft")]
    plot_bars(rates, folder / "components.png", group="setting", bar="stage", bars_order=["before_ft", "after_ft"],
              title="Harmful rate before and after benign fine-tuning (mean ± SEM)")
    figures = [("Harmful rate before and after benign fine-tuning per variant", "components.png")]
    from resalign.eval.reports.validation import validation_figure

    val = validation_figure(folder, report, key="setting")
    return figures + ([val] if val is not None else [])
