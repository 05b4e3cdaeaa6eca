"""Method recipes (kind ``method``): the built-ins, the Tab. 8 peers expressed with resalign's own
components, ``NAME-LOSS`` / ``@SOLVER``, the roles the report reads, and a plugin's recipe."""

from __future__ import annotations

import json

import pytest

from resalign.cli import main
from resalign.components import MethodRecipe
from resalign.errors import ConfigError, PluginError
from resalign.eval.protocol.methods import method_roles, parse_method
from resalign.hookspecs import hookimpl
from resalign.pipeline.compare import method_run_config
from resalign.registry import build_registry, get_registry
from resalign.settings.checks import validate
from resalign.settings.run import resolve


def _rc(method, overrides=None, model=None):
    return resolve(method_run_config(method, model, 0, overrides or {}, "cpu", "fp32"))


def test_plugins_lists_every_built_in_recipe(capsys):
    assert main(["plugins", "--kind", "method", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["components"]
    assert {r["kind"] for r in rows} == {"method"}
    assert {r["name"] for r in rows} >= {"base", "ga", "esd", "ca", "resalign", "imma", "meta-unlearning"}
    assert all(r["module"] == "resalign.methods" for r in rows if r["distribution"] == "resalign")


def test_imma_is_a_one_step_unrolled_bilevel_on_one_fixed_configuration():
    rc = _rc("imma", {"J": 4, "solver": "sam", "solver_options": {"rho": 0.05}})
    (config,) = rc.pool.configs()
    assert (rc.beta, rc.solver, rc.solver_options, rc.J) == (1.0, "unrolled", {}, 1)  # the recipe's, not the options'
    assert (config.steps, config.adapter, config.optimizer, config.finetune_loss) == (1, "full", "adam", "denoise")
    assert rc.loss == "ca"  # the preset's harmful loss; imma-LOSS picks another
    assert _rc("imma-esd").loss == "esd"
    validate(rc, get_registry())


def test_meta_unlearning_is_a_first_order_meta_term_with_shared_noise():
    rc = _rc("meta-unlearning")
    assert (rc.beta, rc.solver, rc.J, rc.common_noise, len(rc.pool.configs())) == (0.5, "first-order", 1, True, 1)
    assert rc.fixed_noise and rc.fixed_ft_data and _rc("imma").fixed_ft_data and not _rc("resalign").fixed_noise
    assert _rc("meta-unlearning-ga").loss == "ga"
    validate(rc, get_registry())


def test_names_pick_loss_and_solver_only_where_the_recipe_allows():
    assert parse_method("resalign-bounded-x@sam").loss == "bounded-x"
    assert parse_method("resalign-ga@trajectory").solver == "trajectory"
    with pytest.raises(ConfigError, match="'imma' fixes its solver, '@SOLVER' is for resalign"):
        parse_method("imma@sam")
    with pytest.raises(ConfigError, match=r"method 'ga-esd': expected one of .*imma.*meta-unlearning"):
        parse_method("ga-esd")  # a baseline's loss is its name
    with pytest.raises(ConfigError, match="is not unlearned"):
        method_run_config("base", None, 0, {}, "cpu", "fp32")


def test_roles_come_from_the_recipes():
    losses = {"resalign": "ca", "ca": "ca", "ga": "ga", "imma": "ca"}
    roles = method_roles(["base", "ga", "ca", "imma", "resalign"], losses)
    assert roles["resalign"] == {"ours": True, "matched": False, "unlearns": True, "twin": "ca"}
    assert roles["imma"]["matched"] and not roles["imma"]["ours"] and roles["imma"]["twin"] is None
    assert roles["base"]["unlearns"] is False
    # the twin is the baseline of the resolved loss, and only when it is compared
    assert method_roles(["ga", "resalign-ga"], {"resalign-ga": "ga"})["resalign-ga"]["twin"] == "ga"
    assert method_roles(["ga", "resalign"], {"resalign": "ca"})["resalign"]["twin"] is None


class _Recipes:
    @hookimpl
    def register_methods(self, register):
        register("esd-strong", MethodRecipe(settings={"loss": "esd", "beta": 0.0, "outer_steps": 99}, matched=True))


def test_a_plugin_recipe_is_found_by_name_and_must_be_a_recipe():
    reg = build_registry(entry_points=False, extra_plugins=(_Recipes(),))
    m = parse_method("esd-strong", reg)
    assert m.recipe.settings["outer_steps"] == 99 and reg.info("method", "esd-strong").plugin != "resalign.methods"

    class _Bad:
        @hookimpl
        def register_methods(self, register):
            register("bad", {"loss": "ga"})

    with pytest.raises(PluginError, match="expected a resalign.components.MethodRecipe"):
        build_registry(entry_points=False, extra_plugins=(_Bad(),))


def test_an_imma_run_simulates_its_one_configuration_with_the_unrolled_solver(tiny_toy_dir, tmp_path):
    from resalign.pipeline.run import execute

    small = {"outer_steps": 1, "harm_batch": 2, "preserve_batch": 2, "ft_size": 2, "quick_eval": 0, "val_sims": 0,
             "data": {"harmful": [{"source": "toy:harmful", "n": 4}],
                      "preserve": [{"source": "toy:preservation", "n": 4, "seed": 1}],
                      "finetune": [{"source": "toy:preservation", "n": 4, "seed": 2}], "sample_steps": 2}}
    rc = method_run_config("imma", str(tiny_toy_dir), 0, small, "cpu", "fp32")
    out = execute(rc, tmp_path / "imma", progress=False)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sims = [s for step in steps for s in step.get("simulations", [])]
    assert len(sims) == 1 and sims[0]["config"] == "full/adam/lr=0.0001/T=1/denoise"
    assert sims[0].get("solver") == "unrolled"


def test_strength_matching_extends_the_matched_runs_from_a_reused_resalign_run():
    """``--match strength --match-max-factor F``: the matched methods run F times ResAlign's outer
    steps, also when ResAlign's run is a finished one that ``--run`` reuses (it is then not among the
    configurations to run)."""
    from types import SimpleNamespace

    from resalign.eval.protocol.methods import method_roles, unlearning_configs
    from resalign.settings.run import RunConfig

    roles = method_roles(["ca", "resalign"], {"ca": "ca", "resalign": "ca"})
    cfg = SimpleNamespace(methods=["ca", "resalign"], runs={}, model=None, unlearn={"outer_steps": 20}, device="cpu",
                          dtype="fp32", match="strength", match_every=6, match_max_factor=3)
    made = unlearning_configs(cfg, roles, [0, 1])
    assert list(made[0]) == ["resalign", "ca"]  # ResAlign first: the strength the others are matched to
    assert (made[1]["ca"].outer_steps, made[1]["ca"].checkpoint_every, made[1]["ca"].keep_checkpoints) == (60, 6, 0)
    assert made[1]["resalign"].outer_steps == 20
    reused = SimpleNamespace(**{**vars(cfg), "runs": {"resalign": "RUN"}})
    out = unlearning_configs(reused, roles, [0], reused_config=lambda path: RunConfig(outer_steps=40))
    assert list(out[0]) == ["ca"] and out[0]["ca"].outer_steps == 120
    steps = SimpleNamespace(**{**vars(cfg), "match": "steps"})
    assert unlearning_configs(steps, roles, [0])[0]["ca"].outer_steps == 20
