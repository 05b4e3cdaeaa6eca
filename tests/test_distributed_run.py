"""``torchrun -m resalign run / eval`` with gloo and two CPU processes against the single-process
commands, a killed and resumed two-process run, a failing rank, and the exact resume of a run killed
with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNET = Path("model") / "unet" / "diffusion_pytorch_model.safetensors"

TINY = [
    "--threads", "1", "--no-progress", "-J", "4", "--K", "2",
    "--set", "solver_options.power_iters=2",
    "--set", 'data.harmful=[{source="toy:harmful", n=4}]',
    "--set", 'data.preserve=[{source="toy:preservation", n=4, seed=1}]',
    "--set", 'data.finetune=[{source="toy:preservation", n=3, seed=2}, {source="toy:harmful", n=1, seed=3}]',
    "--set", "data.gen_steps=1", "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=2",
    "--set", "pool.steps=[1, 2]",
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RESALIGN_DIST_TIMEOUT_S": "120"}


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def _ok(cmd: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _run_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--out", str(out), *TINY, *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / UNET)


def _kill_after_checkpoint(cmd: list[str], out: Path, step: int, timeout: float = 150) -> int:
    """Start ``cmd`` in its own process group and SIGKILL the group once checkpoint ``step`` exists;
    returns the step of the latest checkpoint left behind."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and json.loads(latest.read_text())["step"] >= step:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        _kill_job(proc.pid)
    finally:
        if proc.poll() is None:
            _kill_job(proc.pid)
        proc.wait()
    _wait_for_the_lock(out)
    assert not (out / UNET).is_file()
    return json.loads(latest.read_text())["step"]


def _kill_job(pid: int) -> None:
    """SIGKILL the launcher and every process below it (torchrun's workers may sit in a session of
    their own, out of reach of a signal to the launcher's process group)."""
    import psutil

    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def _wait_for_the_lock(out: Path, timeout: float = 30) -> None:
    """Wait until the killed ranks are gone: the launcher's wait does not cover its children, whose
    exit (and the release of the run directory's lock) may come a moment later."""
    import fcntl

    deadline = time.monotonic() + timeout
    with open(out / ".resalign.lock", "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture(scope="module")
def two_rank_run(tiny_toy_dir, tmp_path_factory):
    """An uninterrupted two-process run: J = 4, 3 outer steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("dist") / "two"
    done = _ok(_torchrun("-m", "resalign", *_run_args(tiny_toy_dir, out, "--outer-steps", "3",
                                                      "--set", "checkpoint_every=1")))
    return out, done


def test_two_ranks_give_the_single_process_weights(two_rank_run, tiny_toy_dir, tmp_path):
    two, done = two_rank_run
    one = tmp_path / "one"
    assert main(_run_args(tiny_toy_dir, one, "--outer-steps", "3", "--set", "checkpoint_every=1")) == 0
    a, b, base = _weights(one), _weights(two), load_file(tiny_toy_dir / "unet" / "diffusion_pytorch_model.safetensors")

    def norm(d):
        return sum(float(t.double().pow(2).sum()) for t in d.values()) ** 0.5

    diff = norm({k: a[k].double() - b[k].double() for k in a})
    moved = norm({k: a[k].double() - base[k].double() for k in a})
    assert diff <= 1e-6 * norm(a)  # equal up to the order of the hypergradient sums
    assert diff <= 1e-4 * moved  # ... and that is far below what the run changed
    # the same simulations, dropped and kept alike, with one λ_max per outer step (simulation j = 0's)
    rows_a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    for ra, rb in zip(rows_a, rows_b):
        assert [s["config"] for s in rb["simulations"]] == [s["config"] for s in ra["simulations"]]
        assert [("dropped" in s) for s in rb["simulations"]] == [("dropped" in s) for s in ra["simulations"]]
        lams = {s["lambda_max"] for s in rb["simulations"] if "lambda_max" in s}
        assert len(lams) == 1 and lams.pop() == pytest.approx(ra["simulations"][0]["lambda_max"], rel=1e-5)
    assert rows_b[0]["loss_harm"] == rows_a[0]["loss_harm"]
    # the validation meta-objective: the same held-out simulations, split over the ranks and gathered
    va, vb = rows_a[0]["validation_initial"], rows_b[0]["validation_initial"]
    assert [s["config"] for s in vb["simulations"]] == [s["config"] for s in va["simulations"]]
    assert vb["harm"] == va["harm"] and vb["harm_ft"] == pytest.approx(va["harm_ft"], rel=1e-6)
    assert rows_b[-1]["validation"]["step"] == 3
    assert rows_b[-1]["validation"]["harm_ft"] == pytest.approx(rows_a[-1]["validation"]["harm_ft"], rel=1e-5)
    # rank 0 alone wrote and reported
    assert done.stdout.count("done:") == 1


def test_a_killed_two_rank_run_resumes_to_the_same_weights(two_rank_run, tiny_toy_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = _torchrun("-m", "resalign", *_run_args(tiny_toy_dir, out, "--outer-steps", "3",
                                                 "--set", "checkpoint_every=1"))
    assert _kill_after_checkpoint(cmd, out, 1) < 3
    _ok(_torchrun("-m", "resalign", "run", "--resume", "--out", str(out), "--no-progress"))
    a, b = _weights(two_rank_run[0]), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_run_killed_at_a_random_step_resumes_bitwise(tiny_toy_dir, tmp_path):
    steps = 4
    at = random.Random().randint(1, steps - 1)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    args = ["--outer-steps", str(steps), "--set", "checkpoint_every=1", "-J", "2"]
    assert main(_run_args(tiny_toy_dir, ref, *args)) == 0
    left = _kill_after_checkpoint([sys.executable, "-m", "resalign", *_run_args(tiny_toy_dir, out, *args)], out, at)
    assert at <= left < steps
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    a, b = _weights(ref), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed after checkpoint {left}"


def test_two_rank_eval_gives_the_single_process_report(tiny_toy_dir, tmp_path):
    args = ["eval", str(tiny_toy_dir), "--toy-prompts", "5", "--steps", "2", "--batch-size", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    done = _ok(_torchrun("-m", "resalign", *args, "--out", str(tmp_path / "two")))
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["results"] == one["results"] and len(one["results"]) >= 3
    for name in ("harmful", "implicit", "benign"):
        files = sorted((tmp_path / "one" / "images" / name).glob("*.png"))
        assert len(files) == 5
        for f in files:
            assert f.read_bytes() == (tmp_path / "two" / "images" / name / f.name).read_bytes()
    assert done.stdout.count("report:") == 1


def test_a_failing_rank_stops_the_job_with_its_error(tiny_toy_dir, tmp_path):
    script = str(ROOT / "tests" / "fixtures" / "failing_rank.py")
    t0 = time.monotonic()
    done = subprocess.run(_torchrun(script, *_run_args(tiny_toy_dir, tmp_path / "run", "--outer-steps", "2")),
                          env=_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=110,
                          check=False)
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stdout + done.stderr
    assert time.monotonic() - t0 < 100  # the collectives' timeout is 120 s: the job did not wait for it
