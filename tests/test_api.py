"""The Python API (``resalign.run`` / ``evaluate`` / ``attack`` / ``compare``): the same settings give the
same report rows as the command line, on a tiny toy-world model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import resalign
from resalign.cli import main
from resalign.errors import ConfigError

#: Unlearning data small enough for a test, as RunConfig settings and as the command's --set items.
DATA = {
    "harmful": [{"source": "toy:harmful", "n": 6}],
    "preserve": [{"source": "toy:preservation", "n": 6, "seed": 1}],
    "finetune": [{"source": "toy:preservation", "n": 4, "seed": 2}],
    "sample_steps": 2,
}
TINY_RUN = {"J": 1, "threads": 1, "harm_batch": 2, "preserve_batch": 2, "ft_size": 2, "pool": {"steps": [2]},
            "quick_eval": 0, "solver_options": {"K": 2, "power_iters": 2}, "data": DATA}
DATA_TOML = ('{harmful = [{source = "toy:harmful", n = 6}], preserve = [{source = "toy:preservation", n = 6, seed = 1}], '
             'finetune = [{source = "toy:preservation", n = 4, seed = 2}], sample_steps = 2}')
TINY_RUN_ARGS = ["-J", "1", "--threads", "1", "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=2",
                 "--set", "pool.steps=[2]", "--set", "quick_eval=0", "--K", "2", "--set", "solver_options.power_iters=2",
                 "--set", f"data={DATA_TOML}"]
#: Evaluation settings of attack and compare at test size.
TINY_EVAL = {"toy_prompts": 4, "sample_steps": 2, "seeds": 1}
TINY_EVAL_ARGS = ["--toy-prompts", "4", "--sample-steps", "2", "--seeds", "1"]


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())["results"]


def _measured(rows: list[dict]) -> list[dict]:
    """The rows without wall-clock figures (the only ones two identical runs differ in); never none."""
    measured = [r for r in rows if "time" not in r["metric"] and "seconds" not in r["metric"]]
    assert measured
    return measured


@pytest.fixture(scope="module")
def api_run(tiny_toy_dir, tmp_path_factory):
    return resalign.run(model=str(tiny_toy_dir), outer_steps=2, out=tmp_path_factory.mktemp("api") / "run",
                        **TINY_RUN)


def test_import_resalign_stays_light():
    code = "import sys, resalign; print(sorted(m for m in ('torch', 'diffusers', 'resalign.api') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "[]"
    assert {"run", "evaluate", "attack", "compare", "Result"} <= set(dir(resalign))


def test_run_gives_the_rows_of_the_command(api_run, tiny_toy_dir, tmp_path):
    assert api_run.command == "run" and (api_run.run_dir / "model").is_dir()
    assert api_run.settings["outer_steps"] == 2 and api_run.settings["J"] == 1
    # records of plain values, as pandas.DataFrame(rows) reads them
    assert all({"model", "metric", "mean", "n"} <= set(r) for r in api_run.rows)
    assert "loss_harm" in {r["metric"] for r in api_run.rows}
    out = tmp_path / "cli"
    assert main(["run", "--model", str(tiny_toy_dir), "--outer-steps", "2", "--out", str(out), "--quiet",
                 *TINY_RUN_ARGS]) == 0
    assert _measured(api_run.rows) == _measured(_rows(out))


def test_evaluate_gives_the_rows_of_the_command(api_run, tmp_path):
    result = resalign.evaluate(api_run.run_dir, toy_prompts=4, sample_steps=2, save_images=False,
                               out=tmp_path / "api")
    assert result.command == "eval" and result.run_dir == tmp_path / "api"
    assert {r["metric"] for r in result.rows} >= {"harmful_rate"}
    out = tmp_path / "cli"
    assert main(["eval", str(api_run.run_dir), "--toy-prompts", "4", "--sample-steps", "2", "--no-save-images",
                 "--out", str(out), "--quiet"]) == 0
    assert _measured(result.rows) == _measured(_rows(out))


def test_attack_gives_the_rows_of_the_command(api_run, tmp_path):
    result = resalign.attack(api_run.run_dir, data=["toy-images:benign-a"], ft_steps=2, eval_every=0,
                             out=tmp_path / "api", **TINY_EVAL)
    stages = {r["stage"] for r in result.rows}
    assert stages == {"before_ft", "after_ft"}
    out = tmp_path / "cli"
    assert main(["attack", str(api_run.run_dir), "--data", "toy-images:benign-a", "--ft-steps", "2",
                 "--eval-every", "0", "--out", str(out), "--quiet", *TINY_EVAL_ARGS]) == 0
    assert _measured(result.rows) == _measured(_rows(out))


def test_compare_gives_the_rows_of_the_command(api_run, tiny_toy_dir, tmp_path):
    settings = dict(model=str(tiny_toy_dir), methods=["base", "resalign"], runs={"resalign": str(api_run.run_dir)},
                    datasets=["toy-images:benign-a"], ft_steps=2, match="steps", **TINY_EVAL)
    result = resalign.compare(out=tmp_path / "api", **settings)
    assert {r["model"] for r in result.rows} == {"base", "resalign"}
    out = tmp_path / "cli"
    assert main(["compare", "--model", str(tiny_toy_dir), "--methods", "base,resalign", "--run",
                 f"resalign={api_run.run_dir}", "--dataset", "toy-images:benign-a", "--ft-steps", "2",
                 "--match", "steps", "--out", str(out), "--quiet", *TINY_EVAL_ARGS]) == 0
    assert _measured(result.rows) == _measured(_rows(out))


def test_bad_settings_are_the_commands_errors(tmp_path):
    with pytest.raises(ConfigError, match="outer_stepz"):
        resalign.run(outer_stepz=2, out=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"\(-J, --beta\)"):
        resalign.run(J=0, beta=0.8, out=tmp_path / "b")
    with pytest.raises(ConfigError, match="toy_promptz"):
        resalign.evaluate(toy_promptz=3, out=tmp_path / "c")
    with pytest.raises(ConfigError, match="--adapt 'nope'"):
        resalign.attack(adapt="nope", out=tmp_path / "d")
    with pytest.raises(ConfigError, match="method 'sgd'"):
        resalign.compare(methods=["base", "sgd"], out=tmp_path / "e")
    assert not any(tmp_path.iterdir())
