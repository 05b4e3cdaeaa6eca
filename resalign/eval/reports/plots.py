"""Plots of a tidy report (matplotlib, Agg backend) and sample grids of generated images.

* :func:`plot_curves`: harmful rate against the fine-tuning step with the standard error of the mean
  as a shaded band, one line per model (and dataset), as in the paper's Fig. 2 / 4 / 7;
* :func:`plot_bars`: the table of an experiment as grouped bars with SEM error bars (Tab. 1);
* :func:`save_grid`: a PNG grid of generated images, one labelled row per prompt set or model.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MPLBACKEND", "Agg")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Save through a temporary file and a rename (crash-safe, as every run-directory file)."""
    from resalign.rundir import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    label: Callable[[Mapping[str, Any]], str] | str = "model",
    panel: Callable[[Mapping[str, Any]], str] | str | None = None,
    metric_label: str = "harmful rate",
    title: str = "",
) -> Path:
    """Mean ± SEM against ``step`` for every line (rows with a ``step``), one panel per ``panel`` value."""
    plt = _pyplot()
    lab = label if callable(label) else (lambda r, k=label: str(r.get(k, "")))
    pan = panel if callable(panel) else ((lambda r, k=panel: str(r.get(k, ""))) if panel else (lambda r: ""))
    rows = [r for r in rows if r.get("step") is not None]
    panels: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in rows:
        panels.setdefault(pan(r), {}).setdefault(lab(r), []).append(r)
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.4), squeeze=False, sharey=True)
    for ax, (pname, lines) in zip(axes[0], sorted(panels.items()) or [("", {})]):
        for lname, pts in lines.items():
            line_with_band(ax, pts, "step", lname)
        ax.set_xlabel("fine-tuning step")
        ax.set_title(pname)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel(metric_label)
    return _finish(plt, fig, axes, path, title)


def _finish(plt: Any, fig: Any, axes: Any, path: str | Path, title: str) -> Path:
    """Legend on the last panel, the title, then save and close the figure."""
    axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def line_with_band(ax: Any, pts: Sequence[Mapping[str, Any]], x_key: str, label: str) -> Any:
    """Plot the rows' ``mean`` against ``x_key`` with a ± ``sem`` band; returns the line."""
    pts = sorted(pts, key=lambda r: r[x_key])
    x = np.array([p[x_key] for p in pts], float)
    m = np.array([p["mean"] for p in pts], float)
    s = np.array([p.get("sem") or 0.0 for p in pts], float)
    (line,) = ax.plot(x, m, marker="o", ms=3, label=label)
    ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def plot_bars(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    group: Callable[[Mapping[str, Any]], str] | str = "model",
    bar: Callable[[Mapping[str, Any]], str] | str = "stage",
    groups_order: Sequence[str] | None = None,
    bars_order: Sequence[str] | None = None,
    metric_label: str = "harmful rate",
    title: str = "",
) -> Path:
    """Grouped bars (one group per ``group`` value, one bar per ``bar`` value) with SEM error bars."""
    plt = _pyplot()
    gk = group if callable(group) else (lambda r, k=group: str(r.get(k, "")))
    bk = bar if callable(bar) else (lambda r, k=bar: str(r.get(k, "")))
    cells = {(gk(r), bk(r)): r for r in rows}
    groups = list(groups_order) if groups_order else list(dict.fromkeys(gk(r) for r in rows))
    bars = list(bars_order) if bars_order else list(dict.fromkeys(bk(r) for r in rows))
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(bars)) * 0.6), 3.6))
    x = np.arange(len(groups))
    for i, b in enumerate(bars):
        means = [cells[(g, b)]["mean"] if (g, b) in cells else np.nan for g in groups]
        sems = [(cells[(g, b)].get("sem") or 0.0) if (g, b) in cells else 0.0 for g in groups]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, means, width, yerr=sems, capsize=3, label=b)
    long_labels = max((len(g) for g in groups), default=0) > 10
    ax.set_xticks(x, groups, rotation=20 if long_labels else 0, ha="right" if long_labels else "center")
    ax.set_ylabel(metric_label)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def save_grid(
    rows: Mapping[str, Sequence[np.ndarray]] | np.ndarray,
    path: str | Path,
    *,
    ncols: int = 8,
    title: str = "",
) -> Path:
    """A PNG sample grid: one labelled row of up to ``ncols`` images per entry of ``rows``.

    A row is an array (N, H, W, 3) or a list of images of any sizes. Images are drawn with
    nearest-neighbour interpolation, so the toy world's 16x16 stay legible.
    """
    plt = _pyplot()
    if not isinstance(rows, Mapping):
        rows = {"": rows}
    rows = {k: [np.asarray(im) for im in list(v)[:ncols]] for k, v in rows.items() if len(v)}
    if not rows:
        raise ValueError("save_grid: no images to draw")
    ncols = max(len(v) for v in rows.values())
    height = 0.95 * len(rows) + (0.45 if title else 0.1)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(0.9 * ncols + 1.2, height), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
        axes[r][0].text(-0.1, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.08, top=1 - (0.45 if title else 0.05) / height, bottom=0.02)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / height)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


#: The panels of :func:`plot_validation`: a key of :func:`resalign.core.heldout.curve` and its title.
VALIDATION_PANELS = {"harm": "L_harm(θ)", "harm_ft": "mean L_harm(θ_FT^val)", "rebound": "rebound"}


def plot_validation(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = "",
                    keys: Sequence[str] = tuple(VALIDATION_PANELS)) -> Path:
    """The validation meta-objective (:func:`resalign.core.heldout.curve`) of one or more runs against the
    outer step, one panel per key (default: L_harm(θ), mean L_harm(θ_FT^val), the rebound), one line per run."""
    plt = _pyplot()
    panels = [(k, VALIDATION_PANELS[k]) for k in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for label, pts in curves.items():
            ax.plot([p["step"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=label)
        ax.set_xlabel("outer step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    return _finish(plt, fig, axes, path, title)
