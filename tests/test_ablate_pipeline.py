"""``resalign ablate``: fidelity rows on a tiny toy-shaped model, and the component variants."""

from __future__ import annotations

import pytest

from resalign.errors import ConfigError
from resalign.eval.report import TidyReport
from resalign.pipeline.ablate import (
    AblateComponentsConfig,
    AblateSolversConfig,
    EffectConfig,
    component_variants,
    fidelity_rows,
)

TINY_RUN = {
    "harm_batch": 2,
    "preserve_batch": 2,
    "ft_size": 2,
    "data": {
        "harmful": [{"source": "toy-images:contamination", "n": 4, "seed": 0}],
        "preserve": [{"source": "toy-images:benign-a", "n": 4, "seed": 1}],
        "finetune": [{"source": "toy-images:benign-b", "n": 4, "seed": 2}],
    },
    "pool": {"steps": [2, 3], "optimizers": ["sgd", "adam"], "finetune_losses": ["denoise"], "adapters": ["full"],
             "batch_size": 1},
}


def test_fidelity_rows_on_a_tiny_model(tiny_toy_dir):
    cfg = AblateSolversConfig(
        model=str(tiny_toy_dir), solvers=["richardson", "first-order", "unrolled"], K=[1, 4], gamma=[0.1],
        seeds=1, configs=2, max_steps=3, run=TINY_RUN, effect=EffectConfig(enabled=False),
    )
    report = TidyReport("ablate-solvers")
    extra = fidelity_rows(cfg, report)
    assert len(extra["problems"]) == 2

    def cos(**match):
        (row,) = report.rows(stage="fidelity", metric="cosine", optimizer="all", **match)
        return row

    exact = cos(solver="unrolled")
    assert exact["values"] == [1.0, 1.0]
    first = cos(solver="first-order")
    one_step = cos(solver="richardson", K=1, gamma=0.1, x0="zero")
    # from x_0 = 0, x_1 = ω g / γ is parallel to g: one step points exactly where first-order does
    assert one_step["values"] == pytest.approx(first["values"], abs=1e-6)
    assert all(-1.0 <= v <= 1.0 for v in first["values"])
    secs = report.rows(stage="fidelity", metric="seconds", solver="richardson", K=4, gamma=0.1, x0="grad",
                       optimizer="all")
    assert secs and all(v > 0 for v in secs[0]["values"])
    assert report.rows(stage="fidelity", solver="lambda-max", metric="seconds", optimizer="all")
    per_optimizer = {r["optimizer"] for r in report.rows(stage="fidelity", solver="first-order", metric="cosine")}
    assert "all" in per_optimizer and per_optimizer - {"all"} <= {"sgd", "adam"} and len(per_optimizer) >= 2


def test_component_variants_map_to_run_settings():
    from resalign.components import FinetuneConfig

    cfg = AblateComponentsConfig(J=[1, 3, 5])
    fixed = FinetuneConfig(adapter="lora", lr=1e-3, steps=5, optimizer="adam", finetune_loss="denoise")
    variants = component_variants(cfg, fixed)
    assert variants["full"] == {}
    assert variants["no-hypergradient"] == {"beta": 0.0}
    assert variants["no-meta-config"] == {"J": 1, "pool": {
        "lrs": [1e-3], "lrs_by_optimizer": {"adam": [1e-3]}, "steps": [5], "optimizers": ["adam"],
        "finetune_losses": ["denoise"], "adapters": ["lora"]}}
    assert variants["no-meta-data"] == {"fixed_ft_data": True}
    assert [variants[f"J={j}"] for j in (1, 3, 5)] == [{"J": 1}, {"J": 3}, {"J": 5}]
    with pytest.raises(ConfigError, match="unknown variant 'no-beta'"):
        component_variants(AblateComponentsConfig(variants=["no-beta"]))
