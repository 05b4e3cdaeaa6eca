"""Plots of ``resalign ablate solvers``: fidelity against K, and fidelity against cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resalign.eval.plots import _pyplot, _save, line_with_band


def plot_fidelity_vs_k(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Cosine to the exact hypergradient against K, one line per (solver, γ, x_0); solvers without K as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ks = sorted({r["K"] for r in rows if r.get("K") is not None})
    lines: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("K") is not None:
            group = "" if r.get("optimizer", "all") == "all" else f" ({r['optimizer']})"
            x0 = f" x0={r['x0']}" if r.get("x0") else ""
            lines.setdefault(f"{r['solver']} γ={r['gamma']:g}{x0}{group}", []).append(r)
    for label, pts in lines.items():
        line_with_band(ax, pts, "K", label)
    for r in rows:
        if r.get("K") is None and ks and r.get("optimizer", "all") == "all" and r["solver"] not in ("hvp-setup", "lambda-max"):
            ax.axhline(r["mean"], linestyle="--", linewidth=1, label=r["solver"], color="grey" if r["solver"] == "first-order" else None)
    ax.set_xlabel("K (HVPs / iterations)")
    ax.set_ylabel("cosine to exact hypergradient")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
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
