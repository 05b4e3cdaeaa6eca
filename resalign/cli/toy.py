"""``resalign toy data|pretrain|sample|check``: the embedded toy world."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from resalign.cli import app, console
from resalign.errors import ConfigError

toy_app = typer.Typer(
    help="The embedded toy world: procedural data, pretraining from scratch, sampling, checks.",
    no_args_is_help=True,
)
app.add_typer(toy_app, name="toy")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@toy_app.command("data")
def data_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    n: int = typer.Option(1000, "--n", help="Number of image-caption pairs (or prompts)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    set_name: str = typer.Option(
        "world", "--set",
        help="world | benign-a | benign-b | contamination (image-caption folders); "
        "harmful | implicit | preservation | neutral (prompt files); all (everything, in subfolders).",
    ),
    fmt: str = typer.Option("jsonl", "--format", help="Metadata format of image folders: jsonl or csv."),
) -> None:
    """Write a procedural image-caption folder (PNG + metadata.jsonl) or a prompt file."""
    from resalign.data import toy
    from resalign.data.folders import write_folder
    from resalign.data.prompts import write_prompts

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    prompt_sets = toy.PROMPT_SETS
    names = list(toy.IMAGE_SETS) + list(prompt_sets)
    if set_name != "all" and set_name not in names:
        raise ConfigError(f"--set {set_name!r}: expected one of {', '.join(names)}, all")
    written = []
    todo = names if set_name == "all" else [set_name]
    for name in todo:
        target = out / name if set_name == "all" else out
        if name in toy.IMAGE_SETS:
            ds = toy.IMAGE_SETS[name](n, seed)
            write_folder(target, ds.images, ds.prompts, fmt=fmt)
            written.append((name, str(target), len(ds)))
        else:
            path = out / f"{name}.txt"
            prompts = prompt_sets[name](n, seed)
            write_prompts(path, prompts)
            written.append((name, str(path), len(prompts)))
    table = Table(title="toy data")
    for col in ("set", "written to", "items"):
        table.add_column(col)
    for row in written:
        table.add_row(row[0], row[1], str(row[2]))
    console.print(table)


@toy_app.command("pretrain")
def pretrain_cmd(
    out: Path = typer.Option(None, "--out", help="Output folder (default runs/toy-pretrain-<timestamp>)."),
    steps: int = typer.Option(None, "--steps", help="Base model optimizer steps (default 3600)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (everything is reproducible from it)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Base model batch size (default 32)."),
    classifier_steps: int = typer.Option(None, "--classifier-steps", help="Steps per classifier (default 2500)."),
    eval_samples: int = typer.Option(None, "--eval-samples", help="Images per figure in the final checks (default 240)."),
    check_every: int = typer.Option(None, "--check-every", help="Quick checks every N steps (0: none; default 600)."),
    threads: int = typer.Option(1, "--threads", help="torch threads (1 is fastest on a busy 2-core machine)."),
) -> None:
    """Train the toy base model and classifiers from scratch (the shipped assets are this command's output)."""
    from resalign.models.toy_training import PretrainConfig
    from resalign.pipeline.toy import pretrain
    from resalign.rundir import default_out

    cfg = PretrainConfig(seed=seed, threads=threads)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("classifier_steps", classifier_steps),
                        ("eval_samples", eval_samples), ("check_every", check_every)):
        if value is not None:
            if value < 0 or (value == 0 and name != "check_every"):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(cfg, name, value)
    out = out or default_out("toy-pretrain")
    tasks: dict[str, int] = {}
    with _progress() as bar:

        def progress(stage: str, done: int, total: int, info: dict) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            text = " ".join(
                f"{k.split('@')[0].replace('harmful_rate', 'harm').replace('prompt_accuracy', 'acc')}"
                f"{'@' + k.split('@')[1][:4] if '@' in k else ''}={v:.3f}"
                for k, v in info.items() if isinstance(v, float)
            )
            bar.update(tasks[stage], completed=done, info=text)

        summary = pretrain(out, cfg, progress=progress)
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"toy model checks ({out})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for key, value in summary["figures"].items():
        table.add_row(key, f"{value:.3f}", str(summary["counts"].get(key, "")))
    for key, value in summary.get("classifiers", {}).items():
        if not isinstance(value, dict):
            table.add_row(f"classifier {key}", f"{value:.4f}", "")
    console.print(table)
    if "timings" in summary:
        console.print("timings (s): " + ", ".join(f"{k}={v}" for k, v in summary["timings"].items()))


@toy_app.command("sample")
def sample_cmd(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
    n: int = typer.Option(16, "-n", "--n", help="Images per prompt."),
    out: Path = typer.Option(Path("grid.png"), "--out", help="PNG grid to write."),
    model: str = typer.Option(None, "--model", help="Model folder (default: the shipped toy model)."),
    steps: int = typer.Option(20, "--steps", help="DDIM steps."),
    guidance: float = typer.Option(2.0, "--guidance", help="Classifier-free guidance scale (the toy model's best is 2)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    scale: int = typer.Option(4, "--scale", help="Upscaling of each image in the grid."),
) -> None:
    """Draw ``n`` images per prompt with the (toy) model and save them as a PNG grid, one row per prompt."""
    from resalign.data.folders import save_grid
    from resalign.eval.generate import generate
    from resalign.models.toy import load_toy

    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n}")
    bundle = load_toy(model)
    images = generate(bundle, prompt, images_per_prompt=n, steps=steps, guidance=guidance, seed=seed)
    save_grid(images, out, ncols=n, scale=scale)
    console.print(f"wrote {len(images)} images to {out}")


@toy_app.command("check")
def check_cmd(
    model: str = typer.Option(None, "--model", help="Model folder (default: the shipped toy model)."),
    n: int = typer.Option(240, "--n", help="Images per figure."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    steps: int = typer.Option(20, "--steps", help="DDIM steps."),
    guidance: float = typer.Option(2.0, "--guidance", help="Classifier-free guidance scale (the toy model's best is 2)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Measure a toy model: harmful rates (explicit, implicit, neutral, benign prompts), prompt accuracy, FD."""
    from resalign.models.toy import load_toy
    from resalign.models.toy_training import measure

    bundle = load_toy(model)
    with _progress() as bar:
        task = bar.add_task("checks", total=4 * n, info="")
        res = measure(bundle, n=n, seed=seed, steps=steps, guidance=guidance,
                      progress=lambda d, t: bar.update(task, completed=d))
    summary = {"figures": res.figures, "counts": res.counts, "seconds": round(res.seconds, 1)}
    if as_json:
        console.print_json(json.dumps(summary))
    else:
        _print_summary(summary, Path(str(bundle.source)))
