"""``attack``, ``compare`` and ``ablate`` as sweeps of cells: killed and resumed, and on two gloo ranks,
against the report of one uninterrupted single-process run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resalign.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: Unlearning data small enough for a test (8 pairs per set, generated in 4 steps), as a TOML inline table.
TINY_DATA = (
    '{harmful = [{source = "toy:harmful", n = 8, seed = 0}], '
    'preserve = [{source = "toy:preservation", n = 8, seed = 1}], '
    'finetune = [{source = "toy:preservation", n = 8, seed = 2}], '
    'concept = "ring", anchor = "circle", sample_steps = 4}'
)
#: Its cells: unlearn ga and esd (one phase: the data are given, so on 2 ranks each rank unlearns one);
#: base before × 2 seeds; ga and esd before × 2 seeds each, after × 2 datasets × 2 seeds each.
COMPARE_CELLS = 16
WALL_CLOCK = ("seconds", "timings", "finished")


def _compare_args(out: Path) -> list[str]:
    return ["compare", "--methods", "base,ga,esd", "--match", "steps", "--unlearn-option", "outer_steps=2",
            "--unlearn-option", "J=1", "--unlearn-option", f"data={TINY_DATA}", "--ft-steps", "2", "--seeds", "2",
            "--toy-prompts", "4", "--sample-steps", "2", "--threads", "1", "--out", str(out), "--quiet"]


def _report(out: Path) -> dict:
    """report.json with the run directory's own path and the wall-clock fields taken out."""
    report = json.loads((out / "report.json").read_text().replace(str(out), "OUT"))
    for key in WALL_CLOCK:
        report["settings"].pop(key, None)
    return report


def _records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (out / "cells").glob("*.json") if p.name != "sweep.json"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compare") / "whole"
    assert main(_compare_args(out)) == 0
    assert len(_records(out)) == COMPARE_CELLS
    return _report(out)


def test_compare_killed_between_cells_resumes_without_recomputing(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "resalign", *_compare_args(out)], cwd=ROOT, env=_env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "cells").is_dir() and len(_records(out)) >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-2000:]
    assert not (out / "report.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json") if p.name != "sweep.json"}
    assert 3 <= len(before) < COMPARE_CELLS

    assert main([*_compare_args(out), "--resume"]) == 0
    after = _records(out)
    assert len(after) == COMPARE_CELLS
    for name, stamp in before.items():  # a finished cell is read back, never written again
        assert (out / "cells" / name).stat().st_mtime_ns == stamp, name
    assert _report(out) == uninterrupted


def run_on_two_gloo_ranks(args) -> subprocess.CompletedProcess:
    """``python -m resalign ARGS`` under torchrun with two gloo ranks; fails the test with its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "resalign", *args]
    res = subprocess.run(cmd, cwd=ROOT, env={**_env(), "RESALIGN_DIST_TIMEOUT_S": "240"}, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_compare_on_two_gloo_ranks_gives_the_single_process_rows(uninterrupted, tmp_path):
    out = tmp_path / "ranks"
    res = run_on_two_gloo_ranks(_compare_args(out))
    assert _report(out)["results"] == uninterrupted["results"]
    assert _report(out)["settings"] == uninterrupted["settings"]
    records = _records(out).values()
    assert len(records) == COMPARE_CELLS and {r["rank"] for r in records} == {0, 1}
    # rank 1 unlearned esd, and its saved model is what both ranks then evaluated and fine-tuned
    assert {r["name"]: r["rank"] for r in records if r["name"].startswith("unlearn-")} == {
        "unlearn-ga-u0": 0, "unlearn-esd-u0": 1}
    assert res.stdout.count("report:") == 1  # rank 0 alone prints and writes the report


def _attack_args(model: Path, out: Path) -> list[str]:
    return [str(model), "--data", "toy-images:benign-a", "--steps", "2", "--eval-every", "0", "--seeds", "2",
            "--toy-prompts", "4", "--sample-steps", "2", "--out", str(out), "--quiet"]


def test_attack_resume_skips_finished_seeds(tiny_toy_dir, tmp_path, monkeypatch, capsys):
    from resalign.pipeline import attack

    runs: list[int] = []

    class Counting(attack.Finetuner):
        def run(self, *args, **kwargs):
            runs.append(self.seed)
            return super().run(*args, **kwargs)

    monkeypatch.setattr(attack, "Finetuner", Counting)
    out = tmp_path / "attack"
    assert main(["attack", *_attack_args(tiny_toy_dir, out)]) == 0
    assert runs == [0, 1]
    whole = _report(out)
    # as if killed while seed 1 was fine-tuned: its record and the report are not there yet
    for p in (out / "cells").glob("seed-1-*"):
        p.unlink()
    (out / "report.json").unlink()
    runs.clear()
    assert main(["attack", *_attack_args(tiny_toy_dir, out), "--resume"]) == 0
    assert runs == [1]
    assert _report(out) == whole
    runs.clear()
    assert main(["attack", *_attack_args(tiny_toy_dir, out), "--resume"]) == 0
    assert runs == []  # nothing left to compute
    capsys.readouterr()
    assert main(["attack", *_attack_args(tiny_toy_dir, out), "--resume", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--resume: setting 'ft_steps' differs" in err and "(2 there, 3 now)" in err and runs == []
    assert main(["attack", *_attack_args(tiny_toy_dir, out)[:-3], "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err


def test_ablate_components_resume_skips_finished_variants(tiny_toy_dir, tmp_path, monkeypatch):
    import shutil

    from test_ablate_pipeline import TINY_RUN

    from resalign.pipeline import run as run_module
    from resalign.pipeline.ablate import (
        AblateComponentsConfig,
        EffectConfig,
        run_ablate_components,
    )

    executed: list[str] = []
    real_execute = run_module.execute

    def counting(cfg, out, **kwargs):
        executed.append(Path(out).name)
        return real_execute(cfg, out, **kwargs)

    monkeypatch.setattr(run_module, "execute", counting)
    cfg = AblateComponentsConfig(
        model=str(tiny_toy_dir), variants=["full", "no-hypergradient"], run={**TINY_RUN, "checkpoint_every": 0},
        effect=EffectConfig(outer_steps=1, ft_steps=2, ft_seeds=1, eval_prompts=4),
    )
    out = tmp_path / "ablate"
    _, whole = run_ablate_components(cfg, out, progress=False)
    assert executed == ["run-full", "run-no-hypergradient"]
    # as if killed before the second variant started
    for p in (out / "cells").glob("effect-no-hypergradient-*"):
        p.unlink()
    shutil.rmtree(out / "run-no-hypergradient")
    shutil.rmtree(out / "attack-no-hypergradient")
    executed.clear()
    _, resumed = run_ablate_components(cfg, out, progress=False, resume=True)
    assert executed == ["run-no-hypergradient"]

    def measured(report):  # every row but the unlearning wall time
        return [r for r in report.results if r["metric"] != "train_seconds"]

    assert measured(resumed) == measured(whole) and len(measured(whole)) >= 4
    assert resumed.get(setting="full", metric="train_seconds") == whole.get(setting="full", metric="train_seconds")
