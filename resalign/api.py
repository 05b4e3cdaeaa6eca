"""The Python API: ``resalign.run``, ``resalign.evaluate``, ``resalign.attack`` and ``resalign.compare``.

Each function takes the settings of the command of the same name as keyword arguments, with the names
of its configuration (``config.toml``, ``--set KEY=VALUE``): :class:`~resalign.settings.run.RunConfig`
for ``run``, :class:`~resalign.pipeline.evaluate.EvalConfig`, :class:`~resalign.pipeline.attack.AttackConfig`
and :class:`~resalign.pipeline.compare.CompareConfig` for the others. Nested settings are dicts
(``pool={"steps": [2]}``); a setting left out keeps the command's default, and the same checks run
before any work, raising :class:`~resalign.errors.ConfigError` with the same one-line message.

Each returns a :class:`Result`: the run directory and its tidy ``report.json``, whose rows
``pandas.DataFrame(result.rows)`` reads::

    import resalign

    run = resalign.run(outer_steps=20, J=2, quick_eval=0, out="runs/mine")
    after = resalign.attack(str(run.run_dir), ft_steps=50, seeds=2)

This module sits between :mod:`resalign.cli` and :mod:`resalign.pipeline`: ``resalign run`` parses its
flags into these settings and calls :func:`run`; the other commands resolve the same configurations and
call the same pipelines. It is imported on first use of ``resalign.run`` (and the others), so ``import
resalign`` stays light.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Result", "attack", "compare", "evaluate", "run"]


@dataclass(frozen=True)
class Result:
    """What a command wrote: its run directory and its tidy report (``report.json``)."""

    command: str
    run_dir: Path
    report: dict[str, Any] = field(repr=False)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per measured figure (``model``, ``stage``, ``prompts``, ``metric``, ``mean``, ``sem``,
        ``n``, ``values``, ...): ``pandas.DataFrame(result.rows)``."""
        return list(self.report.get("results", []))

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that produced the report, as resolved."""
        return dict(self.report.get("settings", {}))


def _result(command: str, run_dir: str | Path, report: Any = None) -> Result:
    """The report as written to ``run_dir/report.json`` (on a rank that did not write it: ``report``)."""
    run_dir = Path(run_dir)
    path = run_dir / "report.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        data = report.to_dict() if report is not None else {}
    return Result(command, run_dir, data)


def _out(out: str | Path | None, command: str) -> Path:
    from resalign.rundir import default_out

    return Path(out) if out is not None else default_out(command)


def _sweep_out(out: str | Path | None, command: str, resume: bool) -> Path:
    """As the commands: ``resume`` and ``torchrun`` need ``out``, else a new timestamped folder."""
    from resalign.distributed import launched
    from resalign.errors import ConfigError

    if out is None and resume:
        raise ConfigError(f"{command}: resume needs out=DIR, the run directory to continue")
    if out is None and launched():
        raise ConfigError(f"{command} under torchrun needs out=DIR (every rank writes to the same run directory)")
    if resume:
        from resalign.cells import check_resumable

        check_resumable(out, command)
    return _out(out, command)


def _settings(cls: type, command: str, settings: dict[str, Any]) -> Any:
    """``cls`` from keyword settings (None: the default); unknown keys raise ConfigError naming them."""
    from resalign.config import from_dict

    return from_dict(cls, {k: v for k, v in settings.items() if v is not None}, where=f"{command} settings")


def run(config: str | Path | None = None, *, out: str | Path | None = None, resume: bool = False,
        progress: bool = False, **settings: Any) -> Result:
    """Unlearn with ResAlign (``resalign run``): ``settings`` are RunConfig keys (``outer_steps=2``,
    ``J=1``, ``loss="ga"``, ``pool={"steps": [5]}``, ...), over the TOML file ``config`` if given.

    As the command, the run ends with the quick evaluation (``quick_eval`` prompts per role, 32 unless
    set; 0 turns it off). ``resume=True`` continues the run in ``out`` from its latest checkpoint.
    """
    from resalign.errors import ConfigError
    from resalign.pipeline.run import execute
    from resalign.settings.run import RUN_QUICK_EVAL, load_run_config

    if resume and out is None:
        raise ConfigError("run: resume needs out=DIR (the run to continue)")
    out = _out(out, "run")
    if resume and config is None and (out / "config.toml").is_file():
        config = out / "config.toml"
    cfg = load_run_config({k: v for k, v in settings.items() if v is not None}, config)
    if cfg.quick_eval is None:
        cfg = dataclasses.replace(cfg, quick_eval=RUN_QUICK_EVAL)
    return _result("run", execute(cfg, out, resume=resume, progress=progress))


def evaluate(model: str | Path | None = None, *, out: str | Path | None = None, progress: bool = False,
             **settings: Any) -> Result:
    """Generate from prompt sets and score the images (``resalign eval``): ``model`` a diffusers folder
    or a run directory (default: the toy base model); ``settings`` are EvalConfig keys (``prompts``,
    ``scorers``, ``seeds``, ``toy_prompts``, ``sample_steps``, ...)."""
    from resalign.pipeline.evaluate import EvalConfig, run_eval

    cfg = _settings(EvalConfig, "eval", {"model": str(model) if model is not None else None, **settings})
    path, report = run_eval(cfg, _out(out, "eval"), progress=progress)
    return _result("eval", path, report)


def attack(model: str | Path | None = None, *, out: str | Path | None = None, resume: bool = False,
           progress: bool = False, **settings: Any) -> Result:
    """Fine-tune as a downstream user would and measure along the way (``resalign attack``): ``model``
    as for :func:`evaluate`; ``settings`` are AttackConfig keys (``adapt``, ``data``, ``ft_steps``,
    ``seeds``, ``eval_every``, ...)."""
    from resalign.pipeline.attack import AttackConfig, run_attack

    cfg = _settings(AttackConfig, "attack", {"model": str(model) if model is not None else None, **settings})
    path, report = run_attack(cfg, _sweep_out(out, "attack", resume), progress=progress, resume=resume)
    return _result("attack", path, report)


def compare(*, out: str | Path | None = None, resume: bool = False, progress: bool = False,
            **settings: Any) -> Result:
    """Base, plain-unlearning baselines and ResAlign before and after benign fine-tuning (``resalign
    compare``): ``settings`` are CompareConfig keys (``methods``, ``unlearn`` (RunConfig keys of every
    unlearning run), ``datasets``, ``ft_steps``, ``seeds``, ...)."""
    from resalign.pipeline.compare import CompareConfig, check_compare_config, run_compare

    cfg = _settings(CompareConfig, "compare", settings)
    check_compare_config(cfg)
    path, report = run_compare(cfg, _sweep_out(out, "compare", resume), progress=progress, resume=resume)
    return _result("compare", path, report)
