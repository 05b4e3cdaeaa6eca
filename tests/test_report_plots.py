"""Plots of a tidy report: curves with SEM bands, grouped bars, labelled sample grids (Agg backend)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from resalign.eval.reports.plots import plot_bars, plot_curves, save_grid


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_curves_bars_and_grid(tmp_path):
    rows = [dict(model=m, dataset=d, prompts="harmful", step=s, mean=0.1 + 0.002 * s * (m == "ga"), sem=0.03)
            for m in ("ga", "resalign") for d in ("benign-a", "benign-b") for s in (0, 50, 100, 150, 200)]
    rows.append(dict(model="ga", metric="prompt_accuracy", mean=0.9, sem=0.0))  # no step: not a curve point
    curves = _png(plot_curves(rows, tmp_path / "c.png", panel="dataset", title="t"))
    assert curves.shape[1] > 1.5 * curves.shape[0]  # two panels side by side

    bars = [dict(model=m, stage=s, mean=v, sem=0.02) for m, s, v in
            [("base", "before", 0.9), ("ga", "before", 0.1), ("ga", "after", 0.8), ("resalign", "before", 0.1)]]
    _png(plot_bars(bars, tmp_path / "b.png", groups_order=["base", "ga", "resalign"], bars_order=["before", "after"]))

    red = np.zeros((3, 16, 16, 3), np.uint8)
    red[..., 0] = 255
    grid = _png(save_grid({"harmful": red, "benign": red[:1]}, tmp_path / "g.png", title="samples"))
    # the images are drawn (nearest neighbour): pure red pixels are present
    assert ((grid[..., 0] > 250) & (grid[..., 1] < 5) & (grid[..., 2] < 5)).sum() > 1000
