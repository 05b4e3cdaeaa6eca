"""``resalign run``: unlearn a harmful concept with ResAlign (Alg. 2) and write a run directory.

Public API (used by ``resalign compare`` and scripts)::

    cfg = resalign.settings.run.load_run_config({"loss": "esd", "adapt": ["lora"], "outer_steps": 10})
    run_dir = execute(cfg, Path("runs/esd-lora"))
    bundle = T2IBundle.load(run_dir / "model")

The settings (:mod:`resalign.settings.run`) arrive resolved onto their preset, once; the run directory
records them in ``config.toml``. With ``quick_eval`` set (``resalign run``: 32, 0 turns it off) a run
ends with a quick evaluation of the base model against the unlearned one (:mod:`resalign.eval.scoring.quick`,
rows of ``report.json``).

Under ``torchrun`` every rank runs :func:`execute`: each rank computes its share of the simulations of
every outer step, balanced by their predicted costs (:class:`resalign.core.split.Ranks`), every rank
takes the same step, and
rank 0 alone writes the run directory, checkpoints, metrics and progress, and runs the quick
evaluation. Rank 0's configuration, cached data and checkpoint reach the other ranks over the process group.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from resalign import distributed
from resalign.checkpoints import load_checkpoint as _load_checkpoint
from resalign.checkpoints import save_checkpoint as _save_checkpoint
from resalign.errors import ConfigError, RunInterrupted
from resalign.pipeline.prepare import prepare
from resalign.progress import RunProgress, say_health, step_info
from resalign.rundir import RunDir
from resalign.settings.checks import validate
from resalign.settings.run import RunConfig, check_resumable, is_resolved, resolve


# --------------------------------------------------------------------------- checkpoints


def execute(cfg: RunConfig, out: Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Run ResAlign with ``cfg``, writing the run directory ``out``; returns ``out``.

    ``cfg`` comes resolved (:func:`resalign.settings.run.load_run_config`); a RunConfig built in code
    with settings left None is resolved here. ``out/model`` is the unlearned model in diffusers layout
    (loads with ``T2IBundle.load``). ``resume=True`` continues from the latest checkpoint in ``out``
    (the configuration must match, except ``outer_steps``, ``device``, ``threads``, checkpoint and
    quick-evaluation settings). Ctrl-C saves a checkpoint and raises :class:`RunInterrupted`.
    """
    from resalign.registry import get_registry

    cfg = cfg if is_resolved(cfg) else resolve(cfg)
    distributed.init(cfg.device)
    cfg = distributed.broadcast_object(cfg)  # rank 0's (it alone may read --resume's config.toml)
    registry = get_registry()
    components = validate(cfg, registry)
    out = Path(out)
    rd = distributed.on_main(lambda: _open_run_dir(cfg, out, resume))
    main = rd is not None
    local = dataclasses.replace(cfg, device=distributed.local_device(cfg.device))

    t_start = time.perf_counter()
    with RunProgress(progress and main) as bar:
        prep = prepare(local, rd.path / "data" if main else None, registry=registry, components=components,
                       progress=lambda name, done, total: bar.update(f"generate {name}", done, total))
        bundle, trainer = prep.bundle, prep.trainer
        if resume:
            state = distributed.broadcast_object(distributed.on_main(lambda: _load_checkpoint(rd, "cpu")))
            if state is not None:
                torch.set_rng_state(state.pop("rng_torch"))
                trainer.load_state_dict(state)
            if main:
                rows = [r for r in rd.read_metrics() if r.get("step", 0) <= trainer.step]
                rd.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            bar.log(f"resuming at outer step {trainer.step}/{cfg.outer_steps}")

        stopped = False
        bar.update("outer step", trainer.step, cfg.outer_steps)
        try:
            while trainer.step < cfg.outer_steps:
                metrics = trainer.outer_step()
                if main:
                    rd.append_metrics(metrics)
                    bar.update("outer step", trainer.step, cfg.outer_steps, step_info(metrics))
                    if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                        _save_checkpoint(rd, trainer, cfg.keep_checkpoints)
                stopped = distributed.broadcast_object(_plugin_stops(registry, trainer.step, metrics) if main else None)
                if stopped:
                    bar.log(f"a plugin stopped the run after outer step {trainer.step}")
                    break
        except KeyboardInterrupt:
            folder = _save_checkpoint(rd, trainer, cfg.keep_checkpoints) if main else out / "checkpoints"
            raise RunInterrupted(
                f"interrupted after outer step {trainer.step}/{cfg.outer_steps}; checkpoint saved to {folder}; "
                f"continue with: resalign run --resume --out {out}"
            ) from None
        if not main:
            return out
        if trainer.step and (not cfg.checkpoint_every or trainer.step % cfg.checkpoint_every):
            _save_checkpoint(rd, trainer, cfg.keep_checkpoints)
        bundle.save(rd.model_dir, unet_state=trainer.unlearned_weights())
        if cfg.quick_eval:
            bar.log(f"quick evaluation: {cfg.quick_eval} prompts per role, the base model and the unlearned one")
    _finish(rd, cfg, registry, time.perf_counter() - t_start, stopped, progress)
    return rd.path


def _finish(rd: RunDir, cfg: RunConfig, registry, seconds: float, stopped: bool, progress: bool) -> None:
    """Rank 0: the quick evaluation (the unlearned model against the base one), ``report.json`` /
    ``report.md`` and the plugins' ``on_run_end``."""
    from resalign.core.health import simulation_summary
    from resalign.core.heldout import curve
    from resalign.eval.reports.plots import plot_validation
    from resalign.eval.scoring.quick import quick_eval
    from resalign.eval.reports.run import run_markdown, run_report

    rows = rd.read_metrics()
    health = simulation_summary(rows)
    points = curve(rows)
    if points:
        plot_validation({"resalign": points}, rd.path / "validation.png", title="validation meta-objective")
    if progress and health["simulations"]:
        say_health(health)
    quick = quick_eval(cfg, rd.model_dir, distributed.local_device(cfg.device)) if cfg.quick_eval else None
    report = run_report(cfg, rows, health, seconds, quick).to_dict()
    rd.write_json("report.json", report)
    rd.write_text("report.md", run_markdown(cfg, rows, stopped, health, report))
    registry.pm.hook.on_run_end(run_dir=str(rd.path), report=report)


def _open_run_dir(cfg: RunConfig, out: Path, resume: bool) -> RunDir:
    """The run directory of ``execute`` (locked), checked for ``--resume`` and with ``config.toml`` written."""
    from resalign.config import to_dict

    rd = RunDir(out, command="run", resume=resume)
    if resume:
        check_resumable(cfg, rd.file("config.toml"), rd.path)
    elif (rd.checkpoints / "latest.json").is_file():
        raise ConfigError(f"--out {str(out)!r} holds a run; pass --resume to continue it or choose a new folder")
    rd.write_config(to_dict(cfg))
    return rd


def _plugin_stops(registry, step: int, metrics: dict[str, Any]) -> bool:
    """Whether a plugin's ``on_outer_step`` asked to stop the run."""
    answers = registry.pm.hook.on_outer_step(
        step=step, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return any(a is True for a in answers)
