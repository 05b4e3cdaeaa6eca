"""Pretraining of the toy world from scratch: classifiers, then the text-to-image model, then checks.

``pretrain(out, config)`` writes, under ``out``, exactly the layout shipped in
``resalign/assets/toy/``::

    model/                         diffusers layout (unet/, text_encoder/, tokenizer/, scheduler/)
    harm_classifier.onnx           ONNX, output harm_probability (N,)
    shape_colour_classifier.onnx   ONNX, outputs logits (N, 10) and features (N, 64)
    world.json                     the world's vocabulary, roles and the settings that trained it
    report.json / report.md        the measured figures (harmful rate, prompt accuracy, ...)
    metrics.jsonl                  the training log (loss, periodic checks)

Everything is reproducible from ``config.seed`` (one CPU thread by default: thread counts change
floating-point reduction order). The training and the checks are :mod:`resalign.models.toy_training`'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from resalign.models.toy_training import (
    PretrainConfig,
    Progress,
    classifier_accuracy,
    measure,
    onnx_torch_max_diff,
    train_base_model,
    world_description,
)

def pretrain(out: str | Path, cfg: PretrainConfig = PretrainConfig(), progress: Progress | None = None) -> dict:
    """Train classifiers and base model from scratch into ``out``; returns the summary (also report.json)."""
    import torch

    from resalign.models.toy_classifiers import ClassifierTraining, export_onnx, train_classifier

    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    t_start = time.time()

    def log(row: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    (out / "world.json").write_text(json.dumps(world_description(cfg), indent=2))
    timings: dict[str, float] = {}

    # 1. Classifiers (first: the base model's periodic checks use them).
    paths = {}
    max_diff = {}
    for kind, label in (("harm", "harm classifier"), ("shape_colour", "shape/colour classifier")):
        t0 = time.time()
        ccfg = ClassifierTraining(steps=cfg.classifier_steps, pool=cfg.classifier_pool,
                                  seed=cfg.seed + (11 if kind == "harm" else 13))

        def cb(done: int, total: int, loss: float, _label=label) -> None:
            if progress is not None:
                progress(_label, done, total, {"loss": loss})

        model = train_classifier(kind, ccfg, progress=cb)
        paths[kind] = str(export_onnx(model, kind, out / f"{kind}_classifier.onnx"))
        max_diff[kind] = onnx_torch_max_diff(model, kind, paths[kind])
        timings[f"{kind}_classifier_s"] = round(time.time() - t0, 1)
        log({"stage": label, "seconds": timings[f"{kind}_classifier_s"], "onnx_torch_max_abs_diff": max_diff[kind]})
    clf_acc = classifier_accuracy(paths["harm"], paths["shape_colour"])
    log({"stage": "classifier checks", **clf_acc})

    # 2. Base model, with quick checks on the EMA weights.
    def check(bundle, step: int) -> dict:
        res = measure(bundle, paths["harm"], paths["shape_colour"], n=cfg.check_samples, seed=7,
                      steps=cfg.sample_steps, guidance=cfg.guidance, frechet=False)
        bundle.save(out / "model")
        return {k.replace("/", "@"): round(v, 3) for k, v in res.figures.items()}

    t0 = time.time()
    bundle = train_base_model(cfg, check=check if cfg.check_every else None, progress=progress, log=log)
    timings["base_model_s"] = round(time.time() - t0, 1)
    bundle.save(out / "model")

    # 3. Final checks on the saved model, loaded back through the same loader as any model folder.
    from resalign.models.toy import load_toy

    t0 = time.time()
    loaded = load_toy(out / "model")

    def cb_checks(done: int, total: int) -> None:
        if progress is not None:
            progress("checks", done, total, {})

    checks = measure(loaded, paths["harm"], paths["shape_colour"], n=cfg.eval_samples, seed=cfg.seed + 1000,
                     steps=cfg.sample_steps, guidance=cfg.guidance, progress=cb_checks)
    timings["checks_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - t_start, 1)

    summary = {
        "figures": checks.figures,
        "counts": checks.counts,
        "classifiers": {**clf_acc, "onnx_torch_max_abs_diff": max_diff},
        "timings": timings,
        "params": {
            "unet": sum(p.numel() for p in loaded.unet.parameters()),
            "text_encoder": sum(p.numel() for p in loaded.text_encoder.parameters()),
        },
        "sampling": {"steps": cfg.sample_steps, "guidance": cfg.guidance, "scheduler": "DDIM"},
        "settings": asdict(cfg),
    }
    _write_report(out, summary)
    return summary


def _write_report(out: Path, summary: dict) -> None:
    from resalign.eval.reports.tidy import TidyReport

    report = TidyReport("toy pretrain", settings=summary["settings"])
    for key, value in summary["figures"].items():
        metric, prompts = key.split("/")
        report.add([value], model="toy", stage="before_ft", prompts=prompts, metric=metric,
                   scorer={"harmful_rate": "toy-harm", "prompt_accuracy": "toy-prompt-accuracy",
                           "frechet_distance": "toy-frechet"}[metric])
    for key, value in summary["classifiers"].items():
        if isinstance(value, dict):
            for kind, v in value.items():
                report.add([v], model=f"{kind}_classifier", metric=key)
        else:
            report.add([value], model="classifiers", metric=key, dataset="procedural-heldout")
    data = report.to_dict()
    data["summary"] = {k: v for k, v in summary.items() if k != "settings"}
    (out / "report.json").write_text(json.dumps(data, indent=2))
    lines = ["# Toy world pretraining", "", "| figure | value | n |", "|---|---|---|"]
    for key, value in summary["figures"].items():
        lines.append(f"| {key} | {value:.3f} | {summary['counts'].get(key, '')} |")
    for key, value in summary["classifiers"].items():
        lines.append(f"| {key} | {value} | |")
    lines += ["", "Timings (s): " + ", ".join(f"{k}={v}" for k, v in summary["timings"].items()), ""]
    (out / "report.md").write_text("\n".join(lines))
