"""Bad inputs across every command: a non-zero exit within seconds, one line naming the problem, no traceback.

Every case fails before any model is loaded or image generated, so each is quick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resalign.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_toy_dir):
    from resalign.data.folders import write_folder

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00beta = 0.5\x80")
    (root / "syntax.toml").write_text("beta = = 1\n")
    (root / "nan.toml").write_text("outer_lr = nan\n")
    (root / "seed-inf.csv").write_text("prompt,evaluation_seed\na ring,inf\n")
    (root / "guidance-nan.csv").write_text("prompt,evaluation_guidance\na ring,nan\n")
    (root / "no-prompt.csv").write_text("text,categories\na ring,sexual\n")
    (root / "empty.txt").write_text("# only a comment\n\n")
    bad = root / "bad-images"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"this is not a PNG")
    write_folder(root / "mixed", np.zeros((2, 32, 32, 3), np.uint8), ["a", "b"])
    (root / "mixed" / "x.png").write_bytes(b"this is not a PNG")
    escape = root / "escape-meta"
    escape.mkdir()
    (escape / "metadata.jsonl").write_text(json.dumps({"file_name": "../secret.png", "prompt": "p"}) + "\n")
    badjson = root / "bad-json"
    badjson.mkdir()
    (badjson / "metadata.jsonl").write_text("{\"file_name\": \"a.png\", \"prompt\": \n")
    (root / "a-file").write_text("not a folder")
    return {"root": root, "tiny": tiny_toy_dir}


# (id, argv with {root}/{tiny} placeholders, text the one error line must contain)
CASES = [
    # resalign run
    ("run-outer-lr-nan", ["run", "--outer-lr", "nan"], "outer_lr: expected a finite number > 0, got nan"),
    ("run-alpha-inf", ["run", "--alpha", "inf"], "alpha: expected a finite number >= 0, got inf"),
    ("run-device-tpu", ["run", "--device", "tpu"], "device: expected cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("run-device-cuda-99", ["run", "--device", "cuda:99"], "'cuda:99' requested but"),
    ("run-device-cuda-x", ["run", "--device", "cuda:x"], "got 'cuda:x'"),
    ("run-beta-range", ["run", "--beta", "1.5"], "beta: expected a finite number >= 0 and <= 1, got 1.5"),
    ("run-gamma-zero", ["run", "--gamma", "0"], "gamma: expected a finite number > 0"),
    ("run-J-negative", ["run", "-J", "-1"], "J: expected an integer >= 0, got -1"),
    ("run-J-zero-with-beta", ["run", "-J", "0", "--beta", "0.8"], "(-J, --beta): beta > 0 needs J >= 1"),
    ("run-outer-steps-zero", ["run", "--outer-steps", "0"],
     "(--outer-steps): expected an integer >= 1; with no outer step there is no unlearned model to write"),
    ("run-threads-huge", ["run", "--threads", "100000"], "threads: expected an integer >= 0 and <= 4096"),
    ("run-dtype", ["run", "--dtype", "fp64"], "dtype: expected one of"),
    ("run-pool-lr-nan", ["run", "--set", "pool.lrs=[nan]"], "--set 'pool.lrs=[nan]': expected a finite number, got [nan]"),
    ("run-pool-steps-zero", ["run", "--set", "pool.steps=[0, 5]"], "pool.steps[0]: expected an integer >= 1"),
    ("run-solver-omega-nan", ["run", "--set", "solver_options.omega=nan"], "--set 'solver_options.omega=nan': expected a finite number"),
    ("run-loss-cap-inf", ["run", "--loss", "ga", "--set", "loss_options.cap=inf"], "--set 'loss_options.cap=inf': expected a finite number"),
    ("run-sample-steps-zero", ["run", "--set", "data.sample_steps=0"], "data.sample_steps: expected an integer >= 1, got 0"),
    ("run-gen-steps-former-name", ["run", "--set", "data.gen_steps=0"], "data.sample_steps: expected an integer >= 1"),
    ("run-guidance-nan", ["run", "--set", "data.guidance=nan"], "--set 'data.guidance=nan': expected a finite number"),
    ("run-guidance-negative", ["run", "--set", "data.guidance=-1"], "data.guidance: expected a finite number >= 0"),
    ("run-seed-negative", ["run", "--seed", "-1"], "seed: expected an integer >= 0"),
    ("run-params-rank", ["run", "--set", "params_options.rank=0"], "params_options.rank: expected an integer >= 1"),
    ("run-two-values", ["run", "--set", "alpha=1\nbeta = 2"], "expected one TOML value"),
    ("run-set-no-equals", ["run", "--set", "alpha"], "expected KEY=VALUE"),
    ("run-set-empty-key", ["run", "--set", "pool..lrs=[1]"], "expected KEY=VALUE with a dotted KEY"),
    ("run-unknown-key", ["run", "--set", "outer_stepz=3"], "unknown key 'outer_stepz'"),
    ("run-key-like-markup", ["run", "--set", "x[/]=1"], "unknown key 'x[/]'"),
    ("run-key-like-style", ["run", "--set", "x[bold]y=1"], "unknown key 'x[bold]y'"),
    ("run-config-binary", ["run", "--config", "{root}/binary.toml"], "binary.toml' is not UTF-8 text"),
    ("run-config-syntax", ["run", "--config", "{root}/syntax.toml"], "syntax.toml"),
    ("run-config-nan", ["run", "--config", "{root}/nan.toml"], "outer_lr: expected a finite number > 0, got nan"),
    ("run-config-missing", ["run", "--config", "{root}/nope.toml"], "nope.toml' does not exist"),
    ("run-model-missing", ["run", "--model", "{root}/no-model"], "does not exist"),
    ("run-tiny-model-nan", ["run", "--model", "{tiny}", "--outer-lr", "nan"], "outer_lr: expected a finite number"),
    ("run-data-source", ["run", "--set", "data.harmful=[{source = \"{root}/nope.txt\"}]"], "does not exist"),
    ("run-resume-no-out", ["run", "--resume"], "--resume needs --out DIR"),
    ("run-out-is-file", ["run", "--out", "{root}/a-file"], "exists and is not a directory"),
    # resalign eval
    ("eval-binary-prompts", ["eval", "--prompts", "{root}/binary.csv"], "binary.csv' is not UTF-8 text"),
    ("eval-missing-prompts", ["eval", "--prompts", "{root}/nope.txt"], "nope.txt' does not exist"),
    ("eval-empty-prompts", ["eval", "--prompts", "{root}/empty.txt"], "no prompts"),
    ("eval-no-prompt-column", ["eval", "--prompts", "{root}/no-prompt.csv"], "no 'prompt' column"),
    ("eval-seed-inf", ["eval", "--prompts", "{root}/seed-inf.csv"], "field 'evaluation_seed' is not an integer"),
    ("eval-guidance-column-nan", ["eval", "--prompts", "{root}/guidance-nan.csv"], "'evaluation_guidance' must be a finite"),
    ("eval-device-tpu", ["eval", "--device", "tpu"], "--device: expected cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("eval-guidance-nan", ["eval", "--guidance", "nan"], "--guidance: expected a finite number >= 0, got nan"),
    ("eval-limit-zero", ["eval", "--limit", "0"], "--limit: expected an integer >= 1, got 0"),
    ("eval-steps-zero", ["eval", "--steps", "0"], "--sample-steps: expected an integer >= 1"),
    ("eval-seeds-zero", ["eval", "--seeds", "0"], "--seeds: expected an integer >= 1"),
    ("eval-unknown-scorer", ["eval", "--scorer", "nope"], "unknown scorer 'nope'"),
    ("eval-missing-model", ["eval", "{root}/no-model"], "does not exist"),
    ("eval-category-no-file", ["eval", "--category", "sexual"], "--category filters a CSV"),
    ("eval-unknown-preset", ["eval", "--preset", "sd3"], "--preset 'sd3': expected one of toy, sd, sdxl (paper = sd)"),
    # resalign score
    ("score-strict-images", ["score", "{root}/mixed", "--scorer", "toy-harm", "--strict-images"],
     "--strict-images: '{root}/mixed/x.png' is not a readable image"),
    ("score-only-bad-images", ["score", "{root}/bad-images", "--scorer", "toy-harm"], "none of its 1 image file(s) can be read"),
    ("score-missing-folder", ["score", "{root}/nope"], "does not exist or is not a directory"),
    ("score-no-images", ["score", "{root}/escape-meta", "--scorer", "toy-harm"], "holds no images"),
    ("score-unknown-scorer", ["score", "{root}/mixed", "--scorer", "nope"], "unknown scorer 'nope'"),
    ("score-option-nan", ["score", "{root}/mixed", "--scorer", "toy-harm", "--scorer-option", "threshold=NaN"],
     "expected a finite number, got NaN"),
    ("score-option-other-scorer", ["score", "{root}/mixed", "--scorer", "toy-harm", "--scorer-option",
                                   "nudenet.threshold=0.3"], "--scorer-option for nudenet: that scorer is not used"),
    ("score-option-no-name", ["score", "{root}/mixed", "--scorer-option", ".threshold=1"], "with a scorer name"),
    # resalign attack
    ("attack-device-tpu", ["attack", "--device", "tpu"], "--device: expected cpu, cuda, cuda:N or mps"),
    ("attack-escape-p3", ["attack", "--escape", "p=3"], "p must be 1 or 2"),
    ("attack-escape-lambda-nan", ["attack", "--escape", "p=2,lambda=nan"], "lambda must be a finite number >= 0"),
    ("attack-escape-garbage", ["attack", "--escape", "p=two"], "'p=two' is not a number"),
    ("attack-lr-negative", ["attack", "--lr", "-1"], "--lr: expected a finite number > 0, got -1"),
    ("attack-lr-nan", ["attack", "--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    ("attack-contaminate", ["attack", "--contaminate", "1.5"], "--contaminate: expected a finite number >= 0 and <= 1"),
    ("attack-data-missing", ["attack", "--data", "{root}/nope"], "--data '{root}/nope': no such folder"),
    ("attack-data-toy", ["attack", "--data", "toy-images:nope"], "unknown toy set"),
    ("attack-data-escaping-name", ["attack", "--data", "{root}/escape-meta"], "must be a relative path inside the folder"),
    ("attack-data-bad-json", ["attack", "--data", "{root}/bad-json"], "metadata.jsonl:1: not valid JSON"),
    ("attack-binary-prompts", ["attack", "--prompts", "{root}/binary.csv"], "is not UTF-8 text"),
    ("attack-adapt", ["attack", "--adapt", "nope"], "--adapt 'nope': expected one of"),
    ("attack-optimizer", ["attack", "--optimizer", "lbfgs"], "--optimizer 'lbfgs'"),
    ("attack-seeds-zero", ["attack", "--seeds", "0"], "--seeds: expected an integer >= 1"),
    # resalign compare
    ("compare-device-tpu", ["compare", "--device", "tpu"], "--device: expected cpu, cuda, cuda:N or mps"),
    ("compare-unlearn-nan", ["compare", "--unlearn-option", "outer_lr=NaN"], "expected a finite number, got NaN"),
    ("compare-unlearn-range", ["compare", "--unlearn-option", "gamma=-1"], "gamma: expected a finite number > 0"),
    ("compare-guidance-inf", ["compare", "--guidance", "inf"], "--guidance: expected a finite number >= 0, got inf"),
    ("compare-method", ["compare", "--methods", "base,sgd"], "method 'sgd'"),
    ("compare-lr", ["compare", "--lr", "0"], "--lr: expected a finite number > 0, got 0"),
    ("compare-dataset", ["compare", "--dataset", "{root}/nope"], "--dataset '{root}/nope': no such folder"),
    ("compare-released-missing", ["compare", "--methods", "base,esd-release={root}/nope.safetensors"],
     "checkpoint '{root}/nope.safetensors' does not exist"),
    ("compare-released-no-base", ["compare", "--methods", "base,esd-release={root}/mixed"],
     "is neither a diffusers model folder"),
    ("compare-resume-nothing", ["compare", "--resume", "--out", "{root}/nope"],
     "--resume --out '{root}/nope': does not exist, nothing to resume; run compare without --resume"),
    ("compare-resume-not-a-sweep", ["compare", "--resume", "--out", "{root}/mixed"],
     "--resume --out '{root}/mixed': holds no sweep (no cells/sweep.json), nothing to resume"),
    # resalign ablate
    ("ablate-solvers-resume-nothing", ["ablate", "solvers", "--resume", "--out", "{root}/nope"],
     "nothing to resume; run ablate-solvers without --resume"),
    ("ablate-solvers-device", ["ablate", "solvers", "--device", "tpu"], "--device: expected cpu, cuda, cuda:N or mps"),
    ("ablate-solvers-gamma-nan", ["ablate", "solvers", "--gamma", "nan"], "--gamma values finite numbers > 0"),
    ("ablate-solvers-set-nan", ["ablate", "solvers", "--set", "pool.lrs=[inf]"], "--set 'pool.lrs=[inf]': expected a finite number"),
    ("ablate-components-device", ["ablate", "components", "--device", "cuda:3"], "'cuda:3' requested but"),
    ("ablate-components-set", ["ablate", "components", "--set", "alpha=nan"], "--set 'alpha=nan': expected a finite number"),
    ("ablate-components-ft-seeds", ["ablate", "components", "--ft-seeds", "0"], "--ft-seeds: expected an integer >= 1"),
    # resalign toy / plugins
    ("toy-data-n", ["toy", "data", "--out", "{root}/toy", "--n", "0"], "--n must be >= 1"),
    ("toy-data-set", ["toy", "data", "--out", "{root}/toy", "--set", "nope"], "'nope': expected one of world"),
    ("toy-sample-n", ["toy", "sample", "-p", "x", "-n", "0"], "-n must be >= 1"),
    ("plugins-kind", ["plugins", "--kind", "nope"], "--kind 'nope'"),
]


def _fill(text: str, files) -> str:
    return text.replace("{root}", str(files["root"])).replace("{tiny}", str(files["tiny"]))


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, expected, files, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # default run directories (none should appear) land in a fresh folder
    monkeypatch.delenv("RESALIGN_DEBUG", raising=False)
    argv = [_fill(a, files) for a in argv]
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0, captured
    assert seconds < 15, f"{seconds:.1f} s"
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert _fill(expected, files) in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_at_least_thirty_cases_over_every_command():
    assert len(CASES) >= 34
    assert {c[1][0] for c in CASES} >= {"run", "eval", "score", "attack", "compare", "ablate", "toy", "plugins"}


def test_score_skips_unreadable_images_by_default(files, capsys, tmp_path):
    out = tmp_path / "score"
    code = main(["score", str(files["root"] / "mixed"), "--scorer", "toy-harm", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "x.png" in warnings[0] and "--strict-images" in warnings[0]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["skipped_images"] == ["x.png"]
    assert report["settings"]["n_images"] == 2
    assert "x.png" in (out / "report.md").read_text()


def test_the_defaults_pass_every_check(files):
    from resalign.cli.ablate import _check_common
    from resalign.pipeline.attack import AttackConfig, check_attack_config
    from resalign.pipeline.evaluate import EvalConfig, check_eval_config
    from resalign.settings.checks import validate
    from resalign.settings.run import load_run_config
    from resalign.registry import get_registry

    registry = get_registry()
    for raw in ({}, {"preset": "sd"}, {"model": str(files["tiny"])}, {"loss": "ga", "adapt": ["lora"]}):
        validate(load_run_config(raw), registry)
    check_eval_config(EvalConfig())
    check_attack_config(AttackConfig())
    check_attack_config(AttackConfig(escape="p=2,lambda=0.5", contaminate=0.5, harmful_data="toy-images:contamination"))
    _check_common("cpu", 1, {}, model=None, loss=None)


def test_check_device_counts_the_visible_gpus(monkeypatch):
    import torch

    from resalign.errors import ConfigError
    from resalign.validation import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda") == "cuda"
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"^--device: 'cuda:2' requested but only 2 CUDA device\(s\) are visible"):
        check_device("cuda:2")
    for bad in ("cuda:-1", "cpu:0", "CUDA", " cpu", "cuda:1:2", "gpu", "", None, 0):
        with pytest.raises(ConfigError, match="expected cpu, cuda, cuda:N or mps"):
            check_device(bad)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS is not available"):
        check_device("mps")


def test_plain_unlearning_needs_no_simulation(files):
    from resalign.registry import get_registry
    from resalign.settings.checks import validate
    from resalign.settings.run import load_run_config

    validate(load_run_config({"J": 0, "beta": 0.0}), get_registry())


def test_run_prints_no_torch_jit_warning(files, tmp_path):
    """The FutureWarning that torch's forward-AD decompositions raise about ``torch.jit.script`` when the
    Gauss–Newton products first load them is not shown (in a fresh process, as a user runs it)."""
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "RESALIGN_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PYTHONWARNINGS", None)
    argv = [
        "run", "--model", str(files["tiny"]), "--out", str(tmp_path / "run"), "--outer-steps", "1", "-J", "1",
        "--threads", "1", "--no-progress", "--set", "curvature=\"gauss-newton\"",
        "--set", 'data.harmful=[{source="toy:harmful", n=4}]',
        "--set", 'data.preserve=[{source="toy:preservation", n=4, seed=1}]',
        "--set", 'data.finetune=[{source="toy:preservation", n=4, seed=2}]',
        "--set", "data.sample_steps=2", "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=2",
        "--set", "pool.steps=[2]", "--set", "quick_eval=0", "--K", "2", "--set", "solver_options.power_iters=2",
    ]
    proc = subprocess.run([sys.executable, "-m", "resalign", *argv], env=env, cwd=root, check=False,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "torch.jit.script" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr
