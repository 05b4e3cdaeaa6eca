"""On a Stable-Diffusion-2-shaped model (linear projections, per-block head dimensions) the Hessian of
the fine-tuning loss has eigenvalues below −1/γ, so Richardson on the Hessian halves ω until it falls
back to first-order; on the Gauss–Newton curvature (the presets' default) it converges as it is."""

from __future__ import annotations

import json

import pytest

from resalign.cli import main

SMALL = ["--threads", "1", "--no-progress", "--set", "data.images_per_prompt=1", "--set", "data.gen_steps=2",
         "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=2"]


def _simulations(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [s for r in rows for s in r["simulations"] if "dropped" not in s]


@pytest.mark.slow
def test_richardson_on_gauss_newton_does_not_collapse_to_first_order_on_an_sd2_shaped_model(tiny_sd2_dir, tmp_path):
    runs = {}
    for curvature in ("gauss-newton", "hessian"):
        out = tmp_path / curvature
        assert main(["run", "--model", str(tiny_sd2_dir), "--out", str(out), "--loss", "esd", "--adapt", "lora",
                     "--outer-steps", "3", "--set", f'curvature="{curvature}"', *SMALL]) == 0
        runs[curvature] = _simulations(out)
    gn, hessian = runs["gauss-newton"], runs["hessian"]
    assert len(gn) == 9 and all(s["curvature"] == "gauss-newton" for s in gn)  # sd preset: J = 3
    assert sum(s["halvings"] <= 1 for s in gn) >= 0.9 * len(gn)
    assert not any(s["fallback"] for s in gn) and all(s["correction"] > 0.05 for s in gn)
    # the Hessian's negative curvature: most solves halve ω repeatedly and end at first-order
    assert sum(s["halvings"] >= 4 for s in hessian) >= 0.5 * len(hessian)
    report = (tmp_path / "hessian" / "report.md").read_text()
    assert "in effect first-order" in report and "**Warning:**" in report
    assert "**Warning:**" not in (tmp_path / "gauss-newton" / "report.md").read_text()
