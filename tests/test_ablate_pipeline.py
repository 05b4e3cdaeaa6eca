"""``resalign ablate``: fidelity rows on a tiny toy-shaped model, and the component variants."""

from __future__ import annotations

import pytest

from resalign.errors import ConfigError
from resalign.eval.reports.tidy import TidyReport
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
        seeds=1, configs=1, max_steps=3, run=TINY_RUN, effect=EffectConfig(enabled=False),
    )
    report = TidyReport("ablate-solvers")
    extra = fidelity_rows(cfg, report)
    # one configuration from each (ADAPT method, optimizer) cell of the pool: full/adam and full/sgd
    assert sorted(p["config"].split("/")[1] for p in extra["problems"]) == ["adam", "sgd"]

    def cos(**match):
        (row,) = report.rows(stage="fidelity", metric="cosine", optimizer="all", adapter="all", **match)
        return row

    exact = cos(solver="unrolled")
    assert exact["values"] == [1.0, 1.0]
    first = cos(solver="first-order")
    # from x_0 = 0, x_1 = ω g / γ is parallel to g: one step points exactly where first-order does,
    # whatever the curvature operator
    for curvature in ("hessian", "gauss-newton"):
        one_step = cos(solver="richardson", K=1, gamma=0.1, x0="zero", curvature=curvature)
        assert one_step["values"] == pytest.approx(first["values"], abs=1e-6)
    assert all(-1.0 <= v <= 1.0 for v in first["values"])
    secs = report.rows(stage="fidelity", metric="seconds", solver="richardson", K=4, gamma=0.1, x0="grad",
                       optimizer="all", adapter="all")
    assert secs and all(v > 0 for v in secs[0]["values"])
    assert report.rows(stage="fidelity", solver="lambda-max", metric="seconds", optimizer="all", adapter="all")
    subsets = {(r["optimizer"], r["adapter"]): r["values"]
               for r in report.rows(stage="fidelity", solver="first-order", metric="cosine")}
    assert set(subsets) == {("all", "all"), ("sgd", "all"), ("adam", "all"), ("all", "full"), ("sgd", "full"),
                            ("adam", "full")}
    # every cell holds its own configuration's figure; "all" holds both
    assert sorted(subsets[("sgd", "full")] + subsets[("adam", "full")]) == sorted(subsets[("all", "all")])
    assert subsets[("sgd", "all")] == subsets[("sgd", "full")]


def test_the_reference_solvers_take_part_in_the_fidelity_ablation(tiny_toy_dir):
    """``ablate solvers --solvers sam,trajectory``: measured once each (no K) against the exact hypergradient;
    each has a cosine and a cost per problem."""
    cfg = AblateSolversConfig(
        model=str(tiny_toy_dir), solvers=["sam", "trajectory", "first-order", "unrolled"], K=[1], gamma=[1.0],
        seeds=1, configs=1, max_steps=3, run={**TINY_RUN, "pool": {**TINY_RUN["pool"], "optimizers": ["adam"]}},
        effect=EffectConfig(enabled=False),
    )
    report = TidyReport("ablate-solvers")
    fidelity_rows(cfg, report)
    for solver in ("sam", "trajectory"):
        (row,) = report.rows(stage="fidelity", metric="cosine", solver=solver, optimizer="all", adapter="all")
        assert row.get("K") is None and len(row["values"]) == 1 and -1.0 <= row["values"][0] <= 1.0
        (secs,) = report.rows(stage="fidelity", metric="seconds", solver=solver, optimizer="all", adapter="all")
        assert secs["values"][0] > 0


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
    assert AblateComponentsConfig().effect.ft_steps == 200  # as resalign attack / compare
    assert [variants[f"J={j}"] for j in (1, 3, 5)] == [{"J": 1}, {"J": 3}, {"J": 5}]
    with pytest.raises(ConfigError, match="unknown variant 'no-beta'"):
        component_variants(AblateComponentsConfig(variants=["no-beta"]))


def test_fixed_configuration_defaults_to_full_adam_and_takes_a_label():
    from resalign.core.meta import ConfigPool
    from resalign.eval.ablation.measure import fixed_configuration

    configs = ConfigPool(lrs=[1e-3], lrs_by_optimizer={"sgd": [0.1]}, steps=[5, 10], optimizers=["sgd", "adam"],
                         finetune_losses=["denoise"], adapters=["lora", "full"], max_lr_steps=0).configs()
    assert configs[0].label() == "lora/sgd/lr=0.1/T=5/denoise"  # the pool's first: not the default
    assert fixed_configuration(configs).label() == "full/adam/lr=0.001/T=5/denoise"
    assert fixed_configuration(configs, "lora/adam/lr=0.001/T=10/denoise").label() == "lora/adam/lr=0.001/T=10/denoise"
    with pytest.raises(ConfigError, match="--fixed-config 'full/adam/lr=1/T=5/denoise': not a configuration of the pool"):
        fixed_configuration(configs, "full/adam/lr=1/T=5/denoise")
    only_sgd = [c for c in configs if c.optimizer == "sgd"]
    assert fixed_configuration(only_sgd) is only_sgd[0]


def test_ablate_solvers_cli_applies_set_items_to_the_simulations(tiny_toy_dir, tmp_path):
    """``--set`` reaches the sampled pool: only full/SGD cells are drawn, and the report has the per-cell
    table and the per-configuration lr·λ_max."""
    import json

    from resalign.cli import main

    sets = ["harm_batch=2", "preserve_batch=2", "ft_size=2",
            'data.harmful=[{source="toy-images:contamination", n=4, seed=0}]',
            'data.preserve=[{source="toy-images:benign-a", n=4, seed=1}]',
            'data.finetune=[{source="toy-images:benign-b", n=4, seed=2}]',
            'pool.optimizers=["sgd"]', 'pool.adapters=["full"]', 'pool.finetune_losses=["denoise"]',
            "pool.steps=[2]", "pool.batch_size=1", "pool.lrs_by_optimizer={sgd=[1e-3]}"]
    out = tmp_path / "abl"
    args = ["ablate", "solvers", "--model", str(tiny_toy_dir), "--no-effect", "--seeds", "1", "--configs", "2",
            "--K", "2", "--gamma", "1", "--x0", "zero", "--out", str(out), "--quiet"]
    assert main(args + [x for item in sets for x in ("--set", item)]) == 0
    problems = json.loads((out / "report.json").read_text())["settings"]["problems"]
    assert [p["config"] for p in problems] == ["full/sgd/lr=0.001/T=2/denoise"] * 2
    assert all(p["lr_lambda_max"] == pytest.approx(1e-3 * p["lambda_max"]) for p in problems)
    text = (out / "report.md").read_text()
    assert "| setting | all | full/sgd | sgd | full |" in text and "lr·λ_max" in text
    assert (out / "fidelity_vs_k.png").stat().st_size > 0
    from resalign.cli.run import apply_set_items

    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_set_items({}, ["pool.steps"])
