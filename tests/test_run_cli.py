"""``resalign run`` end to end on a tiny toy-world model: run directory, resume, Ctrl-C, bad input."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from resalign.cli import main
from resalign.config import from_dict
from resalign.errors import RunInterrupted
from resalign.hookspecs import hookimpl
from resalign.models.bundle import T2IBundle
from resalign.pipeline.run import execute
from resalign.settings.run import RunConfig, load_run_config

SMALL = [
    "--threads", "1", "--no-progress", "-J", "1",
    "--set", 'data.harmful=[{source="toy:harmful", n=6}]',
    "--set", 'data.preserve=[{source="toy:preservation", n=6, seed=1}]',
    "--set", 'data.finetune=[{source="toy:preservation", n=4, seed=2}, {source="toy:harmful", n=2, seed=3}]',
    "--set", "data.gen_steps=2", "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=2",
    "--set", "pool.steps=[2]", "--set", "quick_eval=0",
]
RICHARDSON = ["--K", "2", "--set", "solver_options.power_iters=2"]


def run(tiny_toy_dir, out, *extra):
    solver = [] if "--solver" in extra else RICHARDSON
    return main(["run", "--model", str(tiny_toy_dir), "--out", str(out), *SMALL, *solver, *extra])


def test_run_writes_a_complete_run_directory(tiny_toy_dir, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_toy_dir, out, "--outer-steps", "2", "--set", "checkpoint_every=1", "--set", "quick_eval=4") == 0
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["preset"] == "toy" and cfg["outer_steps"] == 2 and cfg["pool"]["steps"] == [2]
    assert from_dict(RunConfig, cfg).solver == "richardson"  # the recorded config is a valid RunConfig
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss_harm", "loss_reg", "grad_norm", "time_s", "hypergrad_norm", "simulations"):
        assert key in rows[0]
    sim = rows[0]["simulations"][0]
    assert {"config", "x_norms", "residuals", "omega", "lambda_max", "harm_ft"} <= set(sim)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    ckpt = out / "checkpoints" / latest["path"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and "param_groups" in state["optimizer"]
    assert set(load_file(ckpt / "theta.safetensors")) == set(state["param_names"])
    assert "rng.torch" in load_file(ckpt / "optimizer.safetensors")
    bundle = T2IBundle.load(out / "model")
    base = T2IBundle.load(tiny_toy_dir)
    changed = [k for k, v in bundle.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed
    assert (out / "data" / "harmful" / "metadata.jsonl").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "run" and any(r["metric"] == "loss_harm" for r in report["results"])
    quick = {(r["model"], r["prompts"], r["metric"]) for r in report["results"] if r.get("stage") == "quick_eval"}
    assert {(m, "harmful", "harmful_rate") for m in ("base", "unlearned")} <= quick
    assert report["settings"]["quick_eval"] == 4 and report["settings"]["quick_evaluation"]["seed"] == 0


#: A quick plain gradient-ascent unlearning of every UNet weight of the shipped toy model (as
#: tests/test_attack_toy.py's): 4 outer steps take its harmful rate on ring prompts from about 1 to 0.
GA_TOML = """
loss = "ga"
beta = 0.0
params = "full"
alpha = 1.0
outer_lr = 1e-3
outer_steps = 4
checkpoint_every = 0
threads = 1
quick_eval = 16
[loss_options]
cap = 0.5
[data]
harmful = [{source = "toy:harmful", n = 16, seed = 0}]
preserve = [{source = "toy:preservation", n = 16, seed = 1}]
finetune = [{source = "toy:preservation", n = 8, seed = 2}]
concept = "ring"
anchor = "circle"
gen_steps = 10
gen_guidance = 2.0
"""


def test_a_run_ends_with_its_effect_and_the_next_command(tmp_path, capsys):
    from test_attack_toy import _toy_installed

    if not _toy_installed():
        pytest.skip("the toy model is not installed")
    config, out = tmp_path / "ga.toml", tmp_path / "run"
    config.write_text(GA_TOML)
    assert main(["run", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "report.json").read_text())["results"]
    rate = {(r["model"], r["prompts"]): r["mean"] for r in rows
            if r.get("stage") == "quick_eval" and r["metric"] == "harmful_rate"}
    assert {"base", "unlearned"} == {m for m, _ in rate} and {"harmful", "benign"} == {p for _, p in rate}
    assert rate["unlearned", "harmful"] < rate["base", "harmful"], rate
    assert {(r["model"], r["n"]) for r in rows if r.get("metric") == "prompt_accuracy"} == {("base", 1), ("unlearned", 1)}
    assert "quick evaluation" in printed and "harmful_rate" in printed and "prompt_accuracy" in printed
    assert f"resalign attack {out}" in printed
    assert "Quick evaluation" in (out / "report.md").read_text()


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tiny_toy_dir, tmp_path):
    assert run(tiny_toy_dir, tmp_path / "a", "--outer-steps", "3") == 0
    assert run(tiny_toy_dir, tmp_path / "b", "--outer-steps", "2") == 0
    assert main(["run", "--resume", "--out", str(tmp_path / "b"), "--outer-steps", "3", "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(rows_a, rows):
        assert (rb["loss_harm"], rb["loss_reg"]) == (ra["loss_harm"], ra["loss_reg"])
    # bitwise: the resumed run reads its data back from the run directory, θ, AdamW's state and the
    # RNG from the checkpoint, and computes exactly what the uninterrupted run computed
    a = load_file(tmp_path / "a" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resumed run must not change what it unlearns
    assert main(["run", "--resume", "--out", str(tmp_path / "b"), "--beta", "0.1", "--no-progress"]) == 2


class _Interrupt:
    @hookimpl
    def on_outer_step(self, step, metrics):
        if step == 2:
            raise KeyboardInterrupt


class _Stop:
    @hookimpl
    def on_outer_step(self, step, metrics):
        return step >= 1


def _with_plugin(plugin, fn):
    from resalign.registry import get_registry

    pm = get_registry().pm
    pm.register(plugin)
    try:
        return fn()
    finally:
        pm.unregister(plugin)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_toy_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_run_config({"model": str(tiny_toy_dir), "outer_steps": 3, "threads": 1, "J": 1,
                           "data": {"harmful": [{"source": "toy:harmful", "n": 4}],
                                    "preserve": [{"source": "toy:preservation", "n": 4}],
                                    "finetune": [{"source": "toy:preservation", "n": 4}], "gen_steps": 2},
                           "pool": {"steps": [2]}, "solver": "first-order"})
    with pytest.raises(RunInterrupted, match="resume") as info:
        _with_plugin(_Interrupt(), lambda: execute(cfg, out, progress=False))
    assert "step 2/3" in str(info.value)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert execute(cfg, out, resume=True, progress=False) == out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # a run started from code has no quick evaluation unless its settings ask for one
    assert "quick_evaluation" not in json.loads((out / "report.json").read_text())["settings"]


def test_an_observer_plugin_can_stop_the_run(tiny_toy_dir, tmp_path):
    out = tmp_path / "run"
    assert _with_plugin(_Stop(), lambda: run(tiny_toy_dir, out, "--outer-steps", "5", "--beta", "0")) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "model" / "unet").is_dir()


@pytest.mark.parametrize("flags", [
    ["--loss", "esd", "--adapt", "lora", "--params", "lora"],
    ["--loss", "ca", "--adapt", "svdiff,custom_diffusion", "--params", "xattn"],
    ["--solver", "unrolled", "--adapt", "full"],
    ["--solver", "first-order", "--beta", "0.3"],
    ["--beta", "0"],
])
def test_every_builtin_is_selectable_by_name(tiny_toy_dir, tmp_path, flags):
    out = tmp_path / "run"
    assert run(tiny_toy_dir, out, "--outer-steps", "1", *flags) == 0
    cfg = tomllib.loads((out / "config.toml").read_text())
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    if "--adapt" in flags:
        wanted = flags[flags.index("--adapt") + 1].split(",")
        assert cfg["pool"]["adapters"] == wanted
        assert all(s["config"].split("/")[0] in wanted for s in row["simulations"])
    if "--beta" in flags and flags[flags.index("--beta") + 1] == "0":
        assert "simulations" not in row


@pytest.mark.parametrize("solver, option", [("sam", "rho=0.1"), ("trajectory", "stride=1")])
def test_the_reference_solvers_run_by_name(tiny_toy_dir, tmp_path, solver, option):
    """``run --solver sam`` / ``--solver trajectory``: the reference methods take the β term's place."""
    out = tmp_path / "run"
    assert run(tiny_toy_dir, out, "--outer-steps", "1", "--solver", solver, "--set", f"solver_options.{option}") == 0
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["solver"] == solver
    sims = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["simulations"]
    kept = [s for s in sims if "dropped" not in s]
    assert kept and all(s["solver"] == solver and s["hvps"] == 0 for s in kept)
    if solver == "trajectory":  # pool.steps = [2]: θ_1 and θ_2 = θ_FT, replayed exactly
        assert all(s["iterates"] == [1, 2] and s["replay_gap"] == 0.0 for s in kept)
    else:
        assert all(s["rho"] == 0.1 and s["harm_perturbed"] >= s["harm_theta"] for s in kept)


def test_plugins_lists_the_reference_solvers_as_built_ins(capsys):
    assert main(["plugins", "--json", "--kind", "solver"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["components"]}
    assert rows["sam"]["module"] == "resalign.solvers.sam"
    assert rows["trajectory"]["module"] == "resalign.solvers.trajectory"


@pytest.mark.parametrize("argv, message", [
    (["--loss", "gaa"], "unknown harmful-loss 'gaa'; did you mean 'ga'?"),
    (["--adapt", "loraa"], "unknown adapter 'loraa'"),
    (["--params", "most"], "params"),
    (["--set", "pool.lrz=[1e-4]"], "unknown key 'lrz'"),
    (["--set", "solver_options.omega_factor=3.0"], "omega_factor"),
    (["--set", "beta=1.5"], "beta"),
])
def test_bad_input_fails_fast_with_a_one_line_error(tiny_toy_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert run(tiny_toy_dir, out, *argv) != 0
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and not out.exists()


def test_missing_model_folder_and_bad_toml(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('loss = "ga"\n[pool]\nlrs = [1e-4]\nstepz = [5]\n')
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "pool: unknown key 'stepz'" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("argv, message", [
    (["run", "--no-such-flag"], "No such option: --no-such-flag"),
    (["run", "--beta", "half"], "Invalid value for '--beta'"),
])
def test_usage_errors_print_a_message_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_metrics_cut_short_by_a_crash_read_up_to_the_last_whole_row(tmp_path):
    from resalign.errors import DataError
    from resalign.rundir import RunDir

    rd = RunDir(tmp_path / "run", command="run")
    rd.append_metrics({"step": 1, "loss_harm": 0.5})
    with open(rd.path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "loss_ha')  # SIGKILL in the middle of a write
    assert rd.read_metrics() == [{"step": 1, "loss_harm": 0.5}]
    (rd.path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        rd.read_metrics()
