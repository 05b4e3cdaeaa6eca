"""The tutorial plugin of docs/plugins.md (tests/fixtures/plugin_pkg), found through its entry point and
used by name in run, attack --adapt, compare --adapt and --methods, ablate solvers --solvers and score --scorer.

The package is "installed" the way pip would leave it for importlib.metadata: a
``resalign_tutorial-0.1.0.dist-info`` folder (METADATA and the entry points of its pyproject.toml) on
``sys.path`` of a fresh interpreter, next to the package's source folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import tomllib

PKG = Path(__file__).parent / "fixtures" / "plugin_pkg"
ROOT = Path(__file__).parent.parent


def install_dist_info(site: Path) -> str:
    """Write the distribution's metadata from its pyproject.toml into ``site``; return its name."""
    project = tomllib.loads((PKG / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())
                  for group, items in project["entry-points"].items())
    (info / "entry_points.txt").write_text(eps)
    return project["name"]


SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from resalign.cli import main

    model, work = sys.argv[1], sys.argv[2]
    data = ["--set", 'data.harmful=[{source="toy:harmful", n=4}]',
            "--set", 'data.preserve=[{source="toy:preservation", n=4, seed=1}]',
            "--set", 'data.finetune=[{source="toy:preservation", n=4, seed=2}]',
            "--set", "data.gen_steps=2", "--set", "harm_batch=2", "--set", "preserve_batch=2", "--set", "ft_size=2",
            "--set", "pool.steps=[2]", "--set", 'pool.finetune_losses=["denoise"]', "--set", 'pool.optimizers=["sgd"]',
            "--set", "pool.lrs_by_optimizer={sgd=[1e-3]}"]
    small_eval = ["--toy-prompts", "2", "--sample-steps", "1", "--seeds", "1", "--quiet"]
    codes = {
        "plugins": main(["plugins", "--json"]),
        "run": main(["run", "--model", model, "--out", f"{work}/run", "--loss", "bounded-ga", "--solver", "neumann",
                     "--adapt", "bitfit", "--outer-steps", "2", "-J", "1", "--gamma", "0.1", *data, "--no-progress"]),
        "attack": main(["attack", f"{work}/run", "--adapt", "bitfit", "--steps", "2", "--eval-every", "0",
                        "--out", f"{work}/attack", *small_eval]),
        "compare": main(["compare", "--model", model, "--methods", "base,resalign,bounded-plain",
                         "--run", f"resalign={work}/run", "--match", "steps", "--unlearn-option", "outer_steps=1",
                         "--unlearn-option", "harm_batch=2", "--unlearn-option", "preserve_batch=2",
                         "--unlearn-option", "quick_eval=0", "--unlearn-option", "val_sims=0", "--unlearn-option",
                         'data={harmful=[{source="toy:harmful", n=4}], preserve=[{source="toy:preservation", n=4, seed=1}], '
                         'finetune=[{source="toy:preservation", n=4, seed=2}], sample_steps=2}',
                         "--adapt", "bitfit", "--ft-steps", "1", "--out", f"{work}/compare", *small_eval]),
        "ablate": main(["ablate", "solvers", "--model", model, "--solvers", "neumann", "--loss", "bounded-ga",
                        "--no-effect", "--adapt", "bitfit", "--seeds", "1", "--configs", "1", "--K", "2", "--gamma", "0.1",
                        "--x0", "zero",
                        "--out", f"{work}/ablate", "--quiet", "--set", 'pool.adapters=["bitfit"]', *data]),
        "score": main(["score", f"{work}/images", "--scorer", "brightness", "--out", f"{work}/score", "--quiet"]),
    }
    # the adapter as downstream fine-tuning runs it: only bias vectors move
    from resalign.eval.protocol.finetune import Finetuner, FinetuneSpec, Stage
    from resalign.eval.protocol.pairs import Pairs
    from resalign.models.bundle import T2IBundle

    bundle = T2IBundle.load(model)
    pairs = Pairs(np.random.default_rng(0).integers(0, 256, (2, bundle.image_size, bundle.image_size, 3), np.uint8),
                  ["a red circle", "a blue square"])
    out = Finetuner(bundle, FinetuneSpec(adapt="bitfit", steps=2, lr=1e-2), [Stage(pairs, 2)]).run()
    changed = sorted(k for k, v in bundle.unet.named_parameters() if not torch.equal(out[k], v.detach()))
    print(json.dumps({"codes": codes, "changed": changed, "n_params": len(out)}))
''')


def test_tutorial_plugin_works_in_every_command(tiny_toy_dir, tmp_path):
    from PIL import Image

    site = tmp_path / "site"
    dist = install_dist_info(site)
    images = tmp_path / "work" / "images"
    images.mkdir(parents=True)
    levels = [10, 100, 200, 250]  # mean intensity /255: 0.04, 0.39, 0.78, 0.98
    for i, v in enumerate(levels):
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(images / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(PKG), str(site)]),
           "RESALIGN_STRICT_PLUGINS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_toy_dir), str(tmp_path / "work")], env=env,
                          check=False, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["codes"] == dict.fromkeys(["plugins", "run", "attack", "compare", "ablate", "score"], 0), proc.stderr[-3000:]
    listed = json.loads(_first_json(proc.stdout))
    mine = {(r["kind"], r["name"]) for r in listed["components"] if r["distribution"] == dist}
    assert mine == {("adapter", "bitfit"), ("solver", "neumann"), ("harmful-loss", "bounded-ga"), ("scorer", "brightness"),
                    ("method", "bounded-plain")}

    work = tmp_path / "work"
    # run: the plugin's loss, solver and adapter made the simulations of Alg. 2
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    sims = [s for step in steps for s in step.get("simulations", [])]
    assert sims and all(s["config"].startswith("bitfit/") for s in sims)
    assert any(s.get("solver") == "neumann" for s in sims)
    # attack and compare fine-tuned with bitfit at its paper_lr (x10 in the toy preset)
    attack = json.loads((work / "attack" / "report.json").read_text())
    assert attack["settings"]["finetune"]["adapt"] == "bitfit" and attack["settings"]["finetune"]["lr"] == 1e-2
    assert {r["stage"] for r in attack["results"]} == {"before_ft", "after_ft"}
    compare = json.loads((work / "compare" / "report.json").read_text())
    assert compare["settings"]["finetune"]["adapt"] == "bitfit"
    assert any(r["stage"] == "after_ft" and r["model"] == "resalign" for r in compare["results"])
    # compare --methods ran the plugin's recipe by name: its loss and β, unlearned here, fine-tuned and measured
    assert {k: compare["settings"]["unlearning"]["bounded-plain"][k] for k in ("loss", "beta")} == {
        "loss": "bounded-ga", "beta": 0.0}
    assert compare["settings"]["method_roles"]["bounded-plain"]["matched"] is True
    assert (work / "compare" / "unlearn" / "bounded-plain" / "model" / "unet").is_dir()
    assert any(r["stage"] == "after_ft" and r["model"] == "bounded-plain" for r in compare["results"])
    ablate = json.loads((work / "ablate" / "report.json").read_text())
    assert any("neumann" in str(r.get("setting")) for r in ablate["results"])
    # score: 2 of the 4 images are brighter than 0.5
    score = json.loads((work / "score" / "report.json").read_text())
    (row,) = [r for r in score["results"] if r["metric"] == "harmful_rate"]
    assert row["scorer"] == "brightness" and row["mean"] == 0.5
    # BitFit trains only the bias vectors, and the fine-tuned weights cover the whole UNet
    assert result["changed"] and all(k.endswith(".bias") for k in result["changed"])


def _first_json(text: str) -> str:
    """The first JSON document printed (``resalign plugins --json``)."""
    obj, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    return json.dumps(obj)
