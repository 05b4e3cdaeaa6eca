"""``resalign run``: flags -> the run settings -> :func:`resalign.api.run`; no algorithm here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from resalign import distributed
from resalign.cli import app, console
from resalign.cli.common import (DEVICE_HELP, DTYPE_HELP, THREADS_HELP, device_option, dtype_option, out_option,
                                 quiet_option, set_option, threads_option)
from resalign.errors import ConfigError


def _default(key: str) -> str:
    """The default of a RunConfig setting as help text: the preset values where it has them."""
    import dataclasses

    from resalign.settings.presets import PRESETS
    from resalign.settings.run import RunConfig

    def fmt(v):
        return ", ".join(map(str, v)) if isinstance(v, list) else str(v)

    *path, last = key.split(".")
    values = []
    shown = {}
    for name in ("toy", "sd", "sdxl"):
        v = PRESETS[name].run
        for k in path:
            v = v.get(k, {})
        if last in v and not (name == "sdxl" and shown.get("sd") == v[last]):
            shown[name] = v[last]
            values.append(f"{name} {fmt(v[last])}")
    if values:
        return "\\[default: " + "; ".join(values) + "]"
    field = {f.name: f for f in dataclasses.fields(RunConfig)}[key]
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return "\\[default: " + fmt(value) + "]"


def apply_set_items(raw: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """Apply ``--set KEY=VALUE`` items (:func:`resalign.config.parse_items`) to the raw RunConfig table ``raw``."""
    from resalign.config import parse_items
    from resalign.settings.run import RunConfig

    return parse_items(items, "--set", raw, cls=RunConfig, what="the run settings")


@app.command("run", no_args_is_help=False)
def run_cmd(
    config: Path = typer.Option(None, "--config", help="TOML file with any RunConfig settings (flags override it)."),
    out: Path = out_option("Run directory \\[default: runs/run-<timestamp>]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    preset: str = typer.Option(None, "--preset", help="auto | toy | sd: values of the settings not given; auto is toy "
                               "without --model, sd with a Stable Diffusion folder " + _default("preset")),
    model: str = typer.Option(None, "--model", help="Diffusers folder (Stable Diffusion, a toy model folder) "
                              "\\[default: the embedded toy model]"),
    loss: str = typer.Option(None, "--loss", help="Harmful loss: ga | esd | ca | a plugin's " + _default("loss")),
    regularizer: str = typer.Option(None, "--regularizer", help="Regularizer R(θ) " + _default("regularizer")),
    solver: str = typer.Option(None, "--solver", help="Hypergradient solver: richardson | first-order | unrolled | sam | trajectory | "
                               "a plugin's " + _default("solver")),
    adapt: list[str] = typer.Option(None, "--adapt", help="ADAPT methods of the pool π(C), repeatable or "
                                    "comma-separated: full, lora, svdiff, custom_diffusion " + _default("pool.adapters")),
    params: str = typer.Option(None, "--params", help="θ: full (all UNet weights, the paper) | xattn | lora (merged "
                               "at the end) " + _default("params")),
    beta: float = typer.Option(None, "--beta", help="β of Eq. 3/4; 0 is plain unlearning (Eq. 2) " + _default("beta")),
    alpha: float = typer.Option(None, "--alpha", help="α, the weight of R(θ) (sd: ramped to alpha_end by a sigmoid) "
                                + _default("alpha")),
    gamma: float = typer.Option(None, "--gamma", help="γ, the Moreau-envelope proximity coefficient (Eq. 5) "
                                + _default("gamma")),
    curvature: str = typer.Option(None, "--curvature", help="Curvature of Eq. 6 given to the solvers: hessian | "
                                  "gauss-newton (positive semi-definite) " + _default("curvature")),
    gamma_rule: str = typer.Option(None, "--gamma-rule", help="γ per simulation: fixed (γ) | reach (γ·T·lr of the "
                                   "configuration) \\[default: fixed]"),
    K: int = typer.Option(None, "--K", help="Richardson iterations K (Alg. 1) \\[default: 5]"),
    J: int = typer.Option(None, "-J", "--inner-samples", help="Configurations C ~ π(C) per outer step " + _default("J")),
    outer_steps: int = typer.Option(None, "--outer-steps", help="Outer iterations I of Alg. 2 " + _default("outer_steps")),
    outer_lr: float = typer.Option(None, "--outer-lr", help="Outer AdamW learning rate " + _default("outer_lr")),
    concept: str = typer.Option(None, "--concept", help="Harmful concept (prompt templates; replaced by the anchor "
                                "for ca) " + _default("data.concept")),
    seed: int = typer.Option(None, "--seed", help="Seed of every random draw of the run " + _default("seed")),
    device: str = device_option(None, DEVICE_HELP + " " + _default("device")),
    dtype: str = dtype_option(None, DTYPE_HELP + "; UNet master weights stay fp32 " + _default("dtype")),
    threads: int = threads_option(None, THREADS_HELP + " " + _default("threads")),
    set_: list[str] = set_option("the run (any RunConfig setting)",
                                 "solver_options.omega=1.0, pool.steps=[5,10], data.sample_steps=2"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    quiet: bool = quiet_option("No progress bar (as --no-progress); the last line names the run directory."),
) -> None:
    """Unlearn a harmful concept with ResAlign (Alg. 2) and write the run directory.

    With no arguments: the embedded toy world's harmful concept, on the CPU, in minutes. Every
    setting and its default (per preset) is written to the run's config.toml; see docs/method.md.
    """
    from resalign.api import run
    from resalign.rundir import default_out

    raw: dict[str, Any] = {}
    flags = {"preset": preset, "model": model, "loss": loss, "regularizer": regularizer, "solver": solver,
             "params": params, "beta": beta, "alpha": alpha, "gamma": gamma, "curvature": curvature,
             "gamma_rule": gamma_rule, "J": J, "outer_steps": outer_steps,
             "outer_lr": outer_lr, "seed": seed, "device": device, "dtype": dtype, "threads": threads}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if adapt:
        raw["adapt"] = [a.strip() for item in adapt for a in item.split(",") if a.strip()]
    if K is not None:
        raw["solver_options"] = {"K": K}
    if concept is not None:
        raw["data"] = {"concept": concept}
    apply_set_items(raw, set_)
    if resume and out is None:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    progress = progress and not quiet and (sys.stderr.isatty() or console.is_terminal)
    run_dir = run(config, out=out or default_out("run"), resume=resume, progress=progress, **raw).run_dir
    if distributed.is_main():
        console.print(f"[green]done:[/] unlearned model in {run_dir / 'model'}; metrics in {run_dir / 'metrics.jsonl'}")
        if not quiet:
            _print_quick_eval(run_dir)


def _print_quick_eval(run_dir: Path) -> None:
    """The run's quick evaluation as a small table (or why it was skipped), then the next command."""
    import json

    from rich.table import Table

    from resalign.eval.reports.run import MODELS, SETTINGS_KEY, quick_table

    report = json.loads((run_dir / "report.json").read_text())
    settings = report["settings"].get(SETTINGS_KEY)
    if settings is not None and "skipped" in settings:
        console.print(f"quick evaluation skipped: {settings['skipped']}", highlight=False)
    elif settings is not None:
        table = Table(title=f"quick evaluation ({report['settings']['quick_eval']} prompts per role, one seed)")
        for col in ("prompts", "metric", *MODELS):
            table.add_column(col, justify="left" if col in ("prompts", "metric") else "right")
        for row in quick_table(report["results"]):
            table.add_row(*row)
        console.print(table)
    console.print(f"next: resalign attack {run_dir}", highlight=False, soft_wrap=True)
