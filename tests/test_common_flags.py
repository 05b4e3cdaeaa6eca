"""Every command takes the common flags (--out, --quiet, --set, --device, --dtype, --threads), ``--set``
reaches the command's configuration, and a flag without a meaning for a command is a clear error."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from resalign.cli import app, main

COMMANDS = [["run"], ["eval"], ["score"], ["attack"], ["compare"], ["ablate", "solvers"], ["ablate", "components"],
            ["toy", "data"], ["toy", "pretrain"], ["toy", "sample"], ["toy", "check"]]
COMMON = ("--out", "--quiet", "--set", "--device", "--dtype", "--threads")


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_lists_the_common_flags(command):
    text = _help(command)
    for flag in COMMON:
        assert re.search(rf"{flag}\b", text), (command, flag)


def test_root_help_lists_every_command_and_the_common_flags():
    text = _help([])
    for name in ("run", "eval", "score", "attack", "compare", "ablate", "toy", "plugins"):
        assert re.search(rf"\b{name}\b", text), name
    assert all(flag in text for flag in COMMON)


def test_former_flag_names_are_hidden_aliases():
    assert "--steps" not in _help(["eval"]) and "--sample-steps" in _help(["eval"])
    assert "--ft-steps" in _help(["attack"]) and not re.search(r"--steps\b", _help(["attack"]))
    assert "--sample-steps" in _help(["toy", "sample"])


@pytest.mark.parametrize("argv, message", [
    (["eval", "--set", "sample_stepz=3"], "--set 'sample_stepz=3': unknown key 'sample_stepz' of eval's settings "
                                          "(did you mean 'sample_steps'?); valid keys: model, prompts"),
    (["run", "--set", "pool.lrz=1"], "unknown key 'lrz' in pool of the run settings (did you mean 'lrs'?); "
                                     "valid keys: lrs, steps"),
    (["eval", "--set", "sample_steps=0"], "--sample-steps: expected an integer >= 1"),
    (["eval", "--sample-steps", "2", "--steps", "3"], "--sample-steps and --steps are the same flag"),
    (["eval", "--set", "guidance=inf"], "--set 'guidance=inf': expected a finite number, got inf"),
    (["score", "{tmp}", "--dtype", "bf16"], "score --dtype: scorers run in their own precision"),
    (["score", "{tmp}", "--scorer", "toy-harm", "--device", "cpu"], "scorer 'toy-harm' has no device option"),
    (["score", "{tmp}", "--set", "nope=1"], "unknown key 'nope' of score's settings; valid keys: images, scorer"),
    (["attack", "--set", "ft_steps=-1"], "--ft-steps: expected an integer >= 0"),
    (["attack", "--set", "scorer_options.x.y.z=1", "--set", "seeds=0"], "--seeds"),
    (["compare", "--set", "unlearn.outer_lr=0"], "outer_lr: expected a finite number > 0"),
    (["compare", "--unlearn-option", "outer_stepz=1"], "unknown key 'outer_stepz'"),
    (["compare", "--set", "methods=[\"base\", \"sgd\"]"], "method 'sgd'"),
    (["ablate", "components", "--dtype", "fp64"], "dtype"),
    (["ablate", "solvers", "--set", "data.sample_steps=0"], "data.sample_steps: expected an integer >= 1"),
    (["toy", "data", "--out", "{tmp}/d", "--device", "cuda"], "toy data --device: the toy world's data is drawn"),
    (["toy", "data", "--out", "{tmp}/d", "--set", "n=0"], "--n must be >= 1"),
    (["toy", "data", "--out", "{tmp}/d", "--set", "dataset=nope"], "--dataset 'nope': expected one of"),
    (["toy", "pretrain", "--dtype", "bf16"], "toy pretrain --dtype: toy pretraining trains in fp32"),
    (["toy", "pretrain", "--set", "lrr=1"], "unknown key 'lrr' of toy pretrain's settings"),
    (["toy", "sample", "-p", "x", "--set", "sample_steps=0"], "--sample-steps: expected an integer >= 1"),
    (["toy", "sample", "-p", "x", "--device", "tpu"], "--device: expected cpu, cuda, cuda:N or mps"),
    (["toy", "check", "--threads", "-1"], "--threads: expected an integer >= 0"),
    (["run", "--set", "data.gen_steps=2", "--set", "data.sample_steps=3"], "are the same setting"),
])
def test_common_flag_errors(argv, message, tmp_path, capsys):
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc != 0
    assert message in " ".join(err.split()), err


def test_toy_data_set_forms(tmp_path, capsys):
    """``--set NAME`` (the former meaning: which data set), ``--set dataset=NAME`` and ``--dataset NAME``."""
    for i, args in enumerate((["--set", "harmful"], ["--set", "dataset=harmful"], ["--dataset", "harmful"])):
        out = tmp_path / str(i)
        assert main(["toy", "data", "--out", str(out), "--set", "n=3", "--quiet", *args]) == 0
        assert len((out / "harmful.txt").read_text().splitlines()) == 3
    assert main(["toy", "data", "--out", str(tmp_path / "x"), "--set", "harmful", "--dataset", "neutral"]) == 2


def test_set_reaches_the_resolved_config():
    from resalign.cli.common import resolve
    from resalign.pipeline.attack import AttackConfig
    from resalign.pipeline.compare import CompareConfig
    from resalign.pipeline.evaluate import EvalConfig

    cfg = resolve(EvalConfig, "eval", {"seed": 1, "guidance": 2.0},
                  ["sample_steps=7", "scorer_options.toy-harm.threshold=0.4", "guidance=3", "category=[\"a\"]"])
    assert (cfg.sample_steps, cfg.guidance, cfg.seed, cfg.category) == (7, 3.0, 1, ["a"])
    assert cfg.scorer_options == {"toy-harm": {"threshold": 0.4}}
    cfg = resolve(CompareConfig, "compare", {"unlearn": {"J": 1}}, ["unlearn.pool.steps=[2]", "device=cuda:1"])
    assert cfg.unlearn == {"J": 1, "pool": {"steps": [2]}} and cfg.device == "cuda:1"
    assert resolve(AttackConfig, "attack", {}, ["ft_steps=5"]).ft_steps == 5


def test_former_run_setting_names_are_read():
    from resalign.settings.run import load_run_config

    cfg = load_run_config({"data": {"gen_steps": 3, "gen_guidance": 1.5}})
    assert (cfg.data.sample_steps, cfg.data.guidance) == (3, 1.5)
