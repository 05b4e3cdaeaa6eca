"""``resalign compare`` on the toy world at test size, and how methods map to unlearning runs."""

from __future__ import annotations

import json
import math

import pytest
import scipy.stats

from resalign.cli import main
from resalign.errors import ConfigError
from resalign.pipeline.compare import method_run_config
from resalign.settings.run import resolve

#: Unlearning data small enough for a test (8 pairs per set, generated in 4 steps), as a TOML inline table.
TINY_DATA = (
    '{harmful = [{source = "toy:harmful", n = 8, seed = 0}], '
    'preserve = [{source = "toy:preservation", n = 8, seed = 1}], '
    'finetune = [{source = "toy:preservation", n = 8, seed = 2}], '
    'concept = "ring", anchor = "circle", sample_steps = 4}'
)


def test_methods_map_to_run_configs():
    ga = method_run_config("ga", None, 3, {"outer_steps": 5}, "cpu", "fp32")
    assert (ga.loss, ga.beta, ga.outer_steps, ga.seed) == ("ga", 0.0, 5, 3)
    esd = method_run_config("esd", None, 0, {}, "cpu", "fp32")
    assert (esd.loss, esd.beta) == ("esd", 0.0)
    ours = method_run_config("resalign", None, 0, {}, "cpu", "fp32")
    assert ours.loss is None and ours.beta is None  # the preset's loss and beta (ResAlign's defaults)
    assert resolve(ours).loss == "ca" and resolve(ours).beta == 0.8  # toy preset
    assert method_run_config("resalign-esd", None, 0, {}, "cpu", "fp32").loss == "esd"
    with pytest.raises(ConfigError, match="outer_stepz"):
        method_run_config("ga", None, 0, {"outer_stepz": 5}, "cpu", "fp32")
    with pytest.raises(ConfigError, match="beta"):
        method_run_config("ga", None, 0, {"beta": 0.5}, "cpu", "fp32")
    with pytest.raises(ConfigError, match="method 'sgd'"):
        method_run_config("sgd", None, 0, {}, "cpu", "fp32")


def test_a_resalign_method_names_its_solver_after_an_at_sign():
    sam = method_run_config("resalign@sam", None, 0, {}, "cpu", "fp32")
    assert resolve(sam).solver == "sam" and resolve(sam).loss == "ca" and resolve(sam).beta == 0.8
    traj = method_run_config("resalign-ga@trajectory", None, 0, {"solver_options": {"stride": 5}}, "cpu", "fp32")
    assert (traj.loss, traj.solver, resolve(traj).solver_options) == ("ga", "trajectory", {"stride": 5})
    # the solver settings are ResAlign's: a β = 0 twin runs no simulation and keeps the preset's solver
    twin = method_run_config("ca", None, 0, {"solver": "sam", "solver_options": {"rho": 0.05}}, "cpu", "fp32")
    assert (twin.beta, twin.solver, twin.solver_options) == (0.0, "richardson", {})
    assert resolve(twin).solver == "richardson"
    with pytest.raises(ConfigError, match="drop --unlearn-option solver"):
        method_run_config("resalign@sam", None, 0, {"solver": "trajectory"}, "cpu", "fp32")
    with pytest.raises(ConfigError, match="name a solver"):
        method_run_config("resalign@", None, 0, {}, "cpu", "fp32")


def test_compare_end_to_end_at_test_size(tmp_path):
    out, md = tmp_path / "cmp", tmp_path / "results.md"
    rc = main([
        "compare", "--methods", "base,ga,resalign", "--unlearn-option", "outer_steps=2", "--match-every", "1",
        "--unlearn-option", "J=1", "--unlearn-option", f"data={TINY_DATA}", "--ft-steps", "2", "--seeds", "2",
        "--toy-prompts", "4", "--sample-steps", "2", "--results-md", str(md), "--out", str(out), "--quiet",
    ])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    rows = rep["results"]
    assert {r["model"] for r in rows} == {"base", "ga", "resalign"}
    assert not [r for r in rows if r["model"] == "base" and r["stage"] == "after_ft"]  # as Tab. 1
    after = [r for r in rows if r["stage"] == "after_ft"]
    assert {(r["model"], r["dataset"], r["prompts"]) for r in after} == {
        (m, d, p) for m in ("ga", "resalign") for d in ("benign-a", "benign-b") for p in ("harmful", "implicit")}
    for r in rows:
        assert r["n"] == 2 and r["sem"] == pytest.approx(scipy.stats.sem(r["values"]))
        assert r["ft_seeds"] == [0, 1] and r.get("unlearn_seeds") == (None if r["model"] == "base" else [0])
    before_metrics = {(r["prompts"], r["metric"]) for r in rows if r["model"] == "base"}
    assert ("benign", "prompt_accuracy") in before_metrics and ("benign", "frechet_distance") in before_metrics
    st = rep["settings"]
    assert st["unlearning"]["ga"]["beta"] == 0.0 and st["unlearning"]["resalign"]["beta"] > 0
    # strength matching: the baseline keeps checkpoints and one of them (or its final weights) is chosen
    assert st["unlearning"]["ga"]["checkpoint_every"] == 1 and st["unlearning"]["ga"]["keep_checkpoints"] == 0
    match = st["matching"]
    assert match["mode"] == "strength" and match["target_model"] == "resalign"
    curve, target, n = match["ga"]["curve"], match["target"], match["images"]
    assert [p["step"] for p in curve][:1] == [1]
    # the rule: the earliest checkpoint whose rate is within 2 binomial SEs of the difference above the
    # target (the curve stops there), else the final weights (None)
    strong = [p["step"] for p in curve
              if p["harmful_rate"] <= target + 2 * math.sqrt(
                  (p["harmful_rate"] * (1 - p["harmful_rate"]) + target * (1 - target)) / n)]
    if strong:
        assert match["ga"]["chosen_step"] == strong[0] == curve[-1]["step"]
    else:
        assert match["ga"]["chosen_step"] is None
    assert set(st["checks"]["resalign_lowest"]) == {"benign-a", "benign-b"}
    text = md.read_text()
    assert "| ga |" in text and "after FT on benign-b: harmful" in text and "Regenerate with" in text
    for f in ("report.md", "report.csv", "harmful_rate_harmful.png", "samples.png"):
        assert (out / f).is_file()

    # without --unlearn-option data, later runs read the first run's generated training data
    from resalign.data.training import shared_data
    from resalign.settings.run import resolve
    from resalign.config import from_dict
    from resalign.settings.run import RunConfig

    data = shared_data(resolve(from_dict(RunConfig, {})).data, out / "unlearn" / "resalign")
    assert data.harmful[0].source.endswith("unlearn/resalign/data/harmful")

    # a finished run is reused, not recomputed
    out2 = tmp_path / "cmp2"
    assert main(["compare", "--methods", "base,ga", "--run", f"ga={out / 'unlearn' / 'ga'}", "--ft-steps", "1",
                 "--seeds", "1", "--toy-prompts", "2", "--sample-steps", "1", "--out", str(out2), "--quiet"]) == 0
    st2 = json.loads((out2 / "report.json").read_text())["settings"]
    assert st2["unlearning"] == {} and not (out2 / "unlearn").exists()


def test_compare_rejects_bad_methods(tmp_path, capsys):
    assert main(["compare", "--methods", "base,sgd", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "sgd" in capsys.readouterr().err
    assert main(["compare", "--methods", "base,ga", "--run", f"esd={tmp_path}", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "not among --methods" in capsys.readouterr().err
    assert main(["compare", "--methods", "ca,resalign@samm", "--out", str(tmp_path / "o"), "--quiet"]) != 0
    assert "unknown solver 'samm'; did you mean 'sam'?" in capsys.readouterr().err
