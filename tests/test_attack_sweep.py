"""Attack sweeps (``attack --sweep``, ``compare --sweep``): the trials Optuna draws, the worst case within
the utility budget, resuming without recomputing a trial, and the report end to end on the toy world."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest

from resalign.cli import main
from resalign.errors import ConfigError
from resalign.eval.protocol import sweep as sweep_mod
from resalign.eval.protocol.sweep import (AttackSweep, Plan, SweepSettings, best_so_far, plan_sweep, trial_configs,
                                          utility_loss, worst_case)
from resalign.settings.presets import preset_named

SPACE = {"lr_factor": [1.0, 3.0], "steps": [10, 20, 40], "adapt": ["full", "lora"]}
#: Fine-tuning of two steps and an evaluation of 4 prompts per set at 2 sampling steps: seconds per trial.
TINY = ["--set", "search_space.steps=[2]", "--toy-prompts", "4", "--sample-steps", "2", "--threads", "1", "--quiet"]


def _record(trial: int, harm: float, loss: float, budget: float = 0.1) -> dict:
    return {"trial": trial, "harmful_rate": harm, "utility_loss": loss, "within_budget": loss <= budget,
            "config": {"adapt": "full"}}


def test_worst_case_is_the_most_harmful_trial_within_budget():
    records = [_record(0, 0.30, 0.00), _record(1, 0.90, 0.25), _record(2, 0.55, 0.10), _record(3, 0.40, -0.02)]
    best = worst_case(records)
    # trial 1 is the most harmful of all, but it cost 0.25 of utility: the budget of 0.1 excludes it
    assert best["trial"] == 2 and best["harmful_rate"] == 0.55
    assert best_so_far(records) == [0.30, 0.30, 0.55, 0.55]
    assert worst_case([_record(0, 0.9, 0.5)]) is None
    assert math.isnan(best_so_far([_record(0, 0.9, 0.5)])[0])


def test_judge_counts_the_utility_loss_in_the_direction_of_the_metric():
    assert utility_loss("prompt_accuracy", 0.9, 0.8) == pytest.approx(0.1)  # higher is better: a drop is a loss
    assert utility_loss("frechet_distance", 100.0, 130.0) == pytest.approx(30.0)  # lower is better: a rise is
    plan = Plan([{"lr_factor": 1.0, "steps": 2, "adapt": "full", "optimizer": "adamw", "data": "d"}], "grid",
                "prompt_accuracy", 0.1, {})
    sweep = AttackSweep(plan, ["m"], data={}, lr_of=lambda a: 1e-4, headline="harmful", seed=5)
    assert sweep.trial(0)["lr"] == pytest.approx(1e-4) and sweep.trial(0)["seed"] == 5

    def figs(harm: float, acc: float) -> list[dict]:
        return [{"prompts": "harmful", "metric": "harmful_rate", "scorer": "h", "value": harm},
                {"prompts": "benign", "metric": "harmful_rate", "scorer": "h", "value": 0.0},
                {"prompts": "benign", "metric": "prompt_accuracy", "scorer": "a", "value": acc}]

    ok = sweep.judge(figs(0.1, 0.90), figs(0.7, 0.85))
    assert ok["within_budget"] and ok["harmful_rate"] == 0.7 and ok["utility_loss"] == pytest.approx(0.05)
    over = sweep.judge(figs(0.1, 0.90), figs(0.8, 0.75))
    assert not over["within_budget"] and over["utility_loss"] == pytest.approx(0.15)


def test_grid_sampler_enumerates_the_grid_and_random_sampler_is_seeded():
    grid = trial_configs(SPACE, None, seed=0, sampler="grid")
    expected = {tuple(c) for c in itertools.product(*SPACE.values())}
    assert len(grid) == len(expected) == 12
    assert {tuple(c[k] for k in SPACE) for c in grid} == expected
    first = trial_configs(SPACE, 8, seed=3, sampler="random")
    assert first == trial_configs(SPACE, 8, seed=3, sampler="random")
    assert first != trial_configs(SPACE, 8, seed=4, sampler="random")
    assert all(c[k] in SPACE[k] for c in first for k in SPACE)


def test_plan_refuses_bad_settings_before_any_work():
    toy = preset_named("toy").sweep
    with pytest.raises(ConfigError, match="search_space.rate"):
        plan_sweep(SweepSettings(sweep=True, search_space={"rate": [1]}), toy, seed=0)
    with pytest.raises(ConfigError, match="--utility-metric 'clip_score'"):
        plan_sweep(SweepSettings(sweep=True, utility_metric="clip_score"), toy, seed=0,
                   utility_metrics=["prompt_accuracy", "frechet_distance"])
    with pytest.raises(ConfigError, match="--utility-budget"):
        plan_sweep(SweepSettings(sweep=True), preset_named("sd").sweep, seed=0, datasets=["x"])
    with pytest.raises(ConfigError, match="--adapt 'nope'"):
        plan_sweep(SweepSettings(sweep=True, search_space={"adapt": ["nope"]}), toy, seed=0)
    plan = plan_sweep(SweepSettings(sweep=True, trials=5), toy, seed=0)
    assert len(plan.trials) == 5 and plan.utility_budget == toy.utility_budget


WALL_CLOCK = ("seconds", "timings", "finished")


def _report(out: Path) -> dict:
    """report.json with the wall-clock fields and the run directory's own path taken out."""
    report = json.loads((out / "report.json").read_text().replace(str(out), "OUT"))
    for key in WALL_CLOCK:
        report["settings"].pop(key, None)
    return report


def _attack_args(out: Path) -> list[str]:
    return ["attack", "--sweep", "--trials", "3", "--utility-budget", "0.3", *TINY, "--out", str(out)]


@pytest.fixture()
def counted(monkeypatch) -> list:
    """The fine-tuning specs that the sweep's trials ran, in order."""
    runs = []
    original = sweep_mod.Finetuner.run

    def counting(self, **kw):
        runs.append(self.spec)
        return original(self, **kw)

    monkeypatch.setattr(sweep_mod.Finetuner, "run", counting)
    return runs


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attack-sweep") / "whole"
    assert main(_attack_args(out)) == 0
    return out


def test_attack_sweep_reports_the_most_harmful_trial_within_budget(whole, tmp_path, counted):
    report = _report(whole)
    trials = report["settings"]["sweep"]["trials"]
    assert len(trials) == 3 and [t["seed"] for t in trials] == [0, 1, 2]
    rows = [r for r in report["results"] if r["stage"] == "after_ft" and r["prompts"] == "harmful"
            and r["metric"] == "harmful_rate"]
    assert [(r["trial"], r["finetune"], r["lr"], r["ft_steps"]) for r in rows] == \
        [(k, t["adapt"], t["lr"], t["steps"]) for k, t in enumerate(trials)]
    for r in rows:  # the verdict is the budget applied to the recorded utilities
        assert r["within_budget"] == (r["utility_before"] - r["utility_after"] <= 0.3)
    within = [r for r in rows if r["within_budget"]]
    worst = [r for r in report["results"] if r["stage"] == "worst_case"]
    if within:
        top = max(within, key=lambda r: r["mean"])
        assert len(worst) == 1 and (worst[0]["mean"], worst[0]["trial"]) == (top["mean"], top["trial"])
    else:
        assert worst == []
    md = (whole / "report.md").read_text()
    assert "Worst-case harmful rate after fine-tuning within the utility budget" in md and "Every trial" in md
    assert (whole / "best_so_far.png").stat().st_size > 1000

    # the fine-tuning runs each trial's configuration
    out = tmp_path / "again"
    assert main(_attack_args(out)) == 0
    assert [(s.adapt, s.optimizer, s.steps, s.resolved_lr()) for s in counted] == \
        [(t["adapt"], t["optimizer"], t["steps"], pytest.approx(t["lr"])) for t in trials]


def test_attack_sweep_resumed_recomputes_no_finished_trial(whole, tmp_path, counted):
    out = tmp_path / "killed"
    shutil.copytree(whole, out)
    # as if killed while trial 2 was fine-tuned: its record and the report are not there yet
    (record,) = (out / "cells").glob("sweep-toy-base-trial2-*.json")
    record.unlink()
    (out / "report.json").unlink()
    assert main([*_attack_args(out), "--resume"]) == 0
    trials = _report(whole)["settings"]["sweep"]["trials"]
    assert [s.steps for s in counted] == [trials[2]["steps"]]
    assert _report(out) == _report(whole)
    counted.clear()
    assert main([*_attack_args(out), "--resume"]) == 0
    assert counted == []


@pytest.mark.slow
def test_attack_sweep_on_two_gloo_ranks_gives_the_single_process_rows(whole, tmp_path):
    from tests.test_sweeps import run_on_two_gloo_ranks

    out = tmp_path / "ranks"
    run_on_two_gloo_ranks(_attack_args(out))
    assert _report(out)["results"] == _report(whole)["results"]
    ranks = {json.loads(p.read_text())["rank"] for p in (out / "cells").glob("sweep-toy-base-trial*.json")}
    assert ranks == {0, 1}


@pytest.mark.slow
def test_compare_sweep_gives_every_method_the_same_trials(tmp_path):
    from tests.test_sweeps import TINY_DATA

    out = tmp_path / "cmp"
    results_md = tmp_path / "results.md"
    assert main(["compare", "--methods", "base,ca", "--match", "steps", "--unlearn-option", "outer_steps=2",
                 "--unlearn-option", "J=1", "--unlearn-option", f"data={TINY_DATA}", "--sweep", "--trials", "2",
                 "--results-md", str(results_md), *TINY, "--out", str(out)]) == 0
    report = _report(out)
    rows = [r for r in report["results"] if r["stage"] == "after_ft" and r["metric"] == "harmful_rate"
            and r["prompts"] == "harmful"]
    config = {m: [(r["trial"], r["finetune"], r["lr"], r["ft_steps"], r["optimizer"], r["dataset"], r["ft_seed"])
                  for r in rows if r["model"] == m] for m in ("base", "ca")}
    assert len(config["base"]) == 2 and config["base"] == config["ca"]
    assert "`ca`" in results_md.read_text() and (out / "best_so_far.png").is_file()
    assert main(["compare", "--methods", "base,ca", "--sweep", "--unlearn-seeds", "2", *TINY,
                 "--out", str(tmp_path / "refused")]) != 0


@pytest.mark.parametrize("extra, expected", [
    (["--utility-budget", "-1"], "--utility-budget"),
    (["--sampler", "tpe"], "--sampler 'tpe'"),
    (["--utility-metric", "clip_score"], "--utility-metric 'clip_score'"),
    (["--escape", "p=2,lambda=0.5"], "--escape is a separate experiment"),
    (["--set", "search_space.steps=[0]"], "search_space.steps"),
])
def test_attack_sweep_refuses_bad_settings_in_one_line(extra, expected, tmp_path, capsys, counted):
    assert main(["attack", "--sweep", *TINY, *extra, "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and counted == []
