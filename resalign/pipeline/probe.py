"""``resalign ablate directions``: which outer-step direction carries resilience (:mod:`resalign.eval.ablation.probes`).

At a run's last checkpoint (θ after its outer steps, with the run's own data, base model, harmful loss
and pool) or at a model folder (θ = that model, the regularizer's reference too), every candidate
direction is stepped along and followed by the preset's downstream attack; the harmful loss after the
attack is compared with the attack of θ itself, paired by attack seed. Cheap: no image generation.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import torch

from resalign.errors import ConfigError


def _run_config(target: Path, overrides: dict[str, Any]):
    from resalign.config import load_toml
    from resalign.settings.run import load_run_config

    if (target / "config.toml").is_file() and (target / "checkpoints").is_dir():
        raw = load_toml(target / "config.toml")
        for key in ("quick_eval",):
            raw.pop(key, None)
        return load_run_config({**raw, **overrides}), True
    if (target / "model_index.json").is_file():
        return load_run_config({"model": str(target), **overrides}), False
    raise ConfigError(f"RUN_OR_MODEL {str(target)!r}: expected a run directory (config.toml and checkpoints/) "
                      "or a model folder (model_index.json)")


def execute(target: str | Path, out: Path, settings, *, ft_data: str | None = None, ft_steps: int | None = None,
            overrides: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the probe; write ``report.json`` / ``report.md`` to ``out``; return the report dict."""
    import tempfile

    from resalign.checkpoints import load_checkpoint
    from resalign.eval.protocol.attack import TOY_DATA_PREFIX, load_pairs, preset_lr
    from resalign.eval.protocol.finetune import Finetuner, FinetuneSpec, Stage
    from resalign.eval.ablation.probes import check_directions, copy_bundle, cosines, directions, probe
    from resalign.eval.reports.tidy import MarkdownTable, TidyReport
    from resalign.pipeline.prepare import prepare
    from resalign.progress import Bars
    from resalign.registry import get_registry
    from resalign.rundir import RunDir
    from resalign.settings.presets import preset_named

    target = Path(target)
    cfg, is_run = _run_config(target, dict(overrides or {}))
    registry = get_registry()
    check_directions(settings.directions, registry.names("solver"))
    preset = preset_named(cfg.preset)
    spec = FinetuneSpec(adapt="full", steps=ft_steps or preset.attack.ft_steps,
                        lr=preset_lr(preset.attack, "full"))
    data_spec = ft_data or TOY_DATA_PREFIX + "benign-a"
    rd = RunDir(out, command="ablate-directions")
    with tempfile.TemporaryDirectory(prefix="resalign-probe-") as tmp:
        prep = prepare(cfg, target / "data" if is_run else Path(tmp), registry=registry)
    trainer = prep.trainer
    if is_run:
        state = load_checkpoint(types.SimpleNamespace(checkpoints=target / "checkpoints"), "cpu")
        if state is None:
            raise ConfigError(f"RUN_OR_MODEL {str(target)!r}: the run has no checkpoint")
        state.pop("rng_torch")
        trainer.load_state_dict(state)
    pairs = load_pairs(data_spec, size=prep.bundle.image_size, toy_size=preset.attack.toy_data_size)
    bundle = copy_bundle(prep.bundle)
    s = trainer.settings
    eval_batch = trainer.data.harmful.sample(settings.eval_pairs, torch.Generator().manual_seed(10_007))

    def attack(weights, seed: int):
        bundle.unet.load_state_dict({k: v.detach() for k, v in weights.items()}, strict=False)
        return Finetuner(bundle, spec, [Stage(pairs, spec.steps, pairs.name)], seed=seed, registry=registry).run()

    def evaluate(weights) -> float:
        with torch.no_grad():
            return float(trainer.harmful_loss(prep.ctx, {k: v.float() for k, v in weights.items()}, eval_batch,
                                              torch.Generator().manual_seed(10_009)))

    with Bars(progress) as bars:
        bars.log(f"directions at outer step {trainer.step} ({'run' if is_run else 'model'} {target})")
        dirs = directions(trainer, settings.directions, settings, registry)
        update = bars.task("probe", 1)
        results, base = probe(trainer, dirs, settings, attack, evaluate,
                              progress=lambda what, done, total: update(done, total, what))
    report = TidyReport("ablate-directions", settings={
        "target": str(target), "step": trainer.step, "loss": cfg.loss, "params": cfg.params, "beta": s.beta,
        "probe": dataclasses.asdict(settings), "attack": {"adapt": spec.adapt, "steps": spec.steps, "lr": spec.lr,
                                                          "data": data_spec},
        "harm": base["harm"], "harm_attacked": base["harm_attacked"],
        "cosines": {f"{a}|{b}": c for (a, b), c in cosines(dirs).items()}})
    table = MarkdownTable("", ["direction", "ε", "‖d‖", "Δ L_harm before attack", "Δ L_harm after attack (mean ± SEM)",
                           "95 % CI", "n"])
    for r in results:
        row = r.row()
        report.add(r.post, metric="harm_change_after_attack", method=r.direction, step_size=r.step_size,
                   pre=row["pre"], norm=r.norm, ci_low=row["post_ci_low"], ci_high=row["post_ci_high"])
        table.rows.append([r.direction, f"{r.step_size:g}", f"{r.norm:.3g}", f"{row['pre']:+.5f}",
                   f"{row['post_mean']:+.5f} ± {row['post_sem']:.5f}",
                   f"[{row['post_ci_low']:+.5f}, {row['post_ci_high']:+.5f}]", str(row["n"])])
    md = [f"# Direction probe at {target} (outer step {trainer.step})", "",
          f"L_harm ({cfg.loss}) on {settings.eval_pairs} harmful pairs with fixed noise: {base['harm']:.5f} before "
          f"the attack, {sum(base['harm_attacked']) / len(base['harm_attacked']):.5f} after it (mean over "
          f"{settings.attack_seeds} attack seeds). Attack: {spec.adapt} fine-tuning, {spec.steps} steps, lr {spec.lr:g}, "
          f"{data_spec}. Each row steps θ by ε along the unit direction; the change after the attack is paired "
          "with the attack of θ under the same seed (Student t interval). Negative: less harmful.", "",
          table.render(), "Cosines between directions:", ""]
    md += [f"- {a} · {b}: {c:+.3f}" for (a, b), c in cosines(dirs).items()]
    out_report = report.to_dict()
    rd.write_json("report.json", out_report)
    rd.write_text("report.md", "\n".join(md) + "\n")
    rd.close()
    return out_report
