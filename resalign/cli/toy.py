"""``resalign toy data|pretrain|sample|check``: the embedded toy world."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from resalign.cli import app, console
from resalign.cli.common import (alias_option, device_option, dtype_option, out_option, pick, quiet_option, refuse,
                                 resolve, set_option, set_torch_threads, threads_option)
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


@dataclass
class ToyDataConfig:
    """Settings of ``resalign toy data``."""

    n: int = 1000
    seed: int = 0
    #: world | benign-a | benign-b | contamination | harmful | implicit | preservation | neutral | all
    dataset: str = "world"
    format: str = "jsonl"


_CPU_ONLY = "the toy world's data is drawn procedurally (numpy, on the CPU)"


@toy_app.command("data")
def data_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    n: int = typer.Option(None, "--n", help="Number of image-caption pairs (or prompts) \\[default: 1000]."),
    seed: int = typer.Option(None, "--seed", help="Random seed \\[default: 0]."),
    dataset: str = typer.Option(
        None, "--dataset",
        help="world | benign-a | benign-b | contamination (image-caption folders); "
        "harmful | implicit | preservation | neutral (prompt files); all (everything, in subfolders) \\[default: world].",
    ),
    fmt: str = typer.Option(None, "--format", help="Metadata format of image folders: jsonl or csv \\[default: jsonl]."),
    set_: list[str] = set_option("toy data (n, seed, dataset, format); a bare NAME is --dataset NAME", "dataset=harmful"),
    quiet: bool = quiet_option(),
    device: str = device_option(None, "Not used: " + _CPU_ONLY + "; giving it is an error"),
    dtype: str = dtype_option(None, "Not used: images are written as 8-bit PNG; giving it is an error"),
    threads: int = threads_option(None, "Not used: " + _CPU_ONLY + "; giving it is an error"),
) -> None:
    """Write a procedural image-caption folder (PNG + metadata.jsonl) or a prompt file."""
    from resalign.data import toy
    from resalign.data.folders import write_folder
    from resalign.data.prompts import write_prompts

    refuse("toy data", "--device", device, _CPU_ONLY)
    refuse("toy data", "--dtype", dtype, "images are written as 8-bit PNG")
    refuse("toy data", "--threads", threads, _CPU_ONLY)
    items = [i for i in set_ or [] if "=" in i]
    bare = [i for i in set_ or [] if "=" not in i]
    if len(bare) > 1 or (bare and dataset is not None):
        raise ConfigError(f"--set {bare[-1]!r}: one data set, named once (--dataset NAME or --set dataset=NAME)")
    cfg = resolve(ToyDataConfig, "toy data", dict(n=n, seed=seed, dataset=dataset or (bare[0] if bare else None),
                                                  format=fmt), items)
    if cfg.n < 1:
        raise ConfigError(f"--n must be >= 1, got {cfg.n}")
    prompt_sets = toy.PROMPT_SETS
    names = list(toy.IMAGE_SETS) + list(prompt_sets)
    set_name = cfg.dataset
    if set_name != "all" and set_name not in names:
        raise ConfigError(f"--dataset {set_name!r}: expected one of {', '.join(names)}, all")
    written = []
    todo = names if set_name == "all" else [set_name]
    for name in todo:
        target = out / name if set_name == "all" else out
        if name in toy.IMAGE_SETS:
            ds = toy.IMAGE_SETS[name](cfg.n, cfg.seed)
            write_folder(target, ds.images, ds.prompts, fmt=cfg.format)
            written.append((name, str(target), len(ds)))
        else:
            path = out / f"{name}.txt"
            prompts = prompt_sets[name](cfg.n, cfg.seed)
            write_prompts(path, prompts)
            written.append((name, str(path), len(prompts)))
    if quiet:
        console.print(f"wrote {', '.join(row[1] for row in written)}")
        return
    table = Table(title="toy data")
    for col in ("set", "written to", "items"):
        table.add_column(col)
    for row in written:
        table.add_row(row[0], row[1], str(row[2]))
    console.print(table)


@toy_app.command("pretrain")
def pretrain_cmd(
    out: Path = out_option("Output folder (default runs/toy-pretrain-<timestamp>)."),
    steps: int = typer.Option(None, "--steps", help="Base model optimizer steps (default 3600)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (everything is reproducible from it; default 0)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Base model batch size (default 32)."),
    classifier_steps: int = typer.Option(None, "--classifier-steps", help="Steps per classifier (default 2500)."),
    eval_samples: int = typer.Option(None, "--eval-samples", help="Images per figure in the final checks (default 240)."),
    check_every: int = typer.Option(None, "--check-every", help="Quick checks every N steps (0: none; default 600)."),
    threads: int = threads_option(None, "torch threads (1 is fastest on a busy 2-core machine) \\[default: 1]"),
    set_: list[str] = set_option("the pretraining (a field of PretrainConfig)", "lr=2e-3"),
    quiet: bool = quiet_option(),
    device: str = device_option(None, "Not used: toy pretraining runs on the CPU; giving it is an error"),
    dtype: str = dtype_option(None, "Not used: toy pretraining trains in fp32; giving it is an error"),
) -> None:
    """Train the toy base model and classifiers from scratch (the shipped assets are this command's output)."""
    from resalign.models.toy_training import PretrainConfig
    from resalign.pipeline.toy import pretrain
    from resalign.rundir import default_out

    refuse("toy pretrain", "--device", device, "toy pretraining runs on the CPU")
    refuse("toy pretrain", "--dtype", dtype, "toy pretraining trains in fp32")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("classifier_steps", classifier_steps),
                        ("eval_samples", eval_samples), ("check_every", check_every)):
        if value is not None and (value < 0 or (value == 0 and name != "check_every")):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    cfg = resolve(PretrainConfig, "toy pretrain", dict(
        seed=seed, threads=threads, steps=steps, batch_size=batch_size, classifier_steps=classifier_steps,
        eval_samples=eval_samples, check_every=check_every), set_)
    out = out or default_out("toy-pretrain")
    if quiet:
        pretrain(out, cfg)
        console.print(f"toy model and classifiers in {out}")
        return
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


@dataclass
class SampleConfig:
    """Settings of ``resalign toy sample`` and ``toy check``."""

    #: model folder (None: the shipped toy model)
    model: str | None = None
    n: int = 16
    sample_steps: int = 20
    guidance: float = 2.0
    seed: int = 0
    scale: int = 4
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 1


def _sample_config(command: str, flags: dict, items: list[str] | None) -> SampleConfig:
    """:class:`SampleConfig` from the flags and ``--set``; the torch threads set, the numbers checked."""
    from resalign.validation import check_device, check_dtype, check_int, check_number

    cfg = resolve(SampleConfig, command, flags, items)
    if cfg.n < 1:
        raise ConfigError(f"-n must be >= 1, got {cfg.n}")
    check_int(cfg.sample_steps, "--sample-steps", ge=1)
    check_number(cfg.guidance, "--guidance", ge=0)
    check_device(cfg.device, "--device")
    check_dtype(cfg.dtype, cfg.device, "--dtype", fp16_needs_cuda=False)
    set_torch_threads(cfg.threads)
    return cfg


@toy_app.command("sample")
def sample_cmd(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
    n: int = typer.Option(None, "-n", "--n", help="Images per prompt \\[default: 16]."),
    out: Path = out_option("PNG grid to write \\[default: grid.png]."),
    model: str = typer.Option(None, "--model", help="Model folder (default: the shipped toy model)."),
    sample_steps: int = typer.Option(None, "--sample-steps", help="DDIM steps \\[default: 20]."),
    steps: int = alias_option("--steps"),
    guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale (the toy model's best is 2) \\[default: 2]."),
    seed: int = typer.Option(None, "--seed", help="Random seed \\[default: 0]."),
    scale: int = typer.Option(None, "--scale", help="Upscaling of each image in the grid \\[default: 4]."),
    device: str = device_option(None, "Torch device of the sampling: cpu | cuda | cuda:N \\[default: cpu]"),
    dtype: str = dtype_option(None, "Compute dtype of the sampling: fp32 | bf16 | fp16 \\[default: fp32]"),
    threads: int = threads_option(None, "Torch CPU threads \\[default: 1]"),
    set_: list[str] = set_option("the sampling (n, sample_steps, guidance, seed, scale, model, ...)", "guidance=3"),
    quiet: bool = quiet_option(),
) -> None:
    """Draw ``n`` images per prompt with the (toy) model and save them as a PNG grid, one row per prompt."""
    from resalign.data.folders import save_grid
    from resalign.eval.scoring.generate import generate
    from resalign.models.toy import load_toy

    cfg = _sample_config("toy sample", dict(model=model, n=n, sample_steps=pick("--sample-steps", sample_steps,
                                                                               "--steps", steps),
                                            guidance=guidance, seed=seed, scale=scale, device=device, dtype=dtype,
                                            threads=threads), set_)
    out = out or Path("grid.png")
    bundle = load_toy(cfg.model, device=cfg.device, dtype=cfg.dtype)
    images = generate(bundle, prompt, images_per_prompt=cfg.n, steps=cfg.sample_steps, guidance=cfg.guidance,
                      seed=cfg.seed)
    save_grid(images, out, ncols=cfg.n, scale=cfg.scale)
    console.print(f"wrote {len(images)} images to {out}")


@toy_app.command("check")
def check_cmd(
    model: str = typer.Option(None, "--model", help="Model folder (default: the shipped toy model)."),
    n: int = typer.Option(240, "--n", help="Images per figure."),
    seed: int = typer.Option(None, "--seed", help="Random seed \\[default: 0]."),
    sample_steps: int = typer.Option(None, "--sample-steps", help="DDIM steps \\[default: 20]."),
    steps: int = alias_option("--steps"),
    guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale (the toy model's best is 2) \\[default: 2]."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    out: Path = out_option("Also write the figures as JSON to this file."),
    device: str = device_option(None, "Torch device of the sampling: cpu | cuda | cuda:N \\[default: cpu]"),
    dtype: str = dtype_option(None, "Compute dtype of the sampling: fp32 | bf16 | fp16 \\[default: fp32]"),
    threads: int = threads_option(None, "Torch CPU threads \\[default: 1]"),
    set_: list[str] = set_option("the checks (n, sample_steps, guidance, seed, model, ...)", "n=80"),
    quiet: bool = quiet_option(),
) -> None:
    """Measure a toy model: harmful rates (explicit, implicit, neutral, benign prompts), prompt accuracy, FD."""
    from resalign.models.toy import load_toy
    from resalign.models.toy_training import measure

    cfg = _sample_config("toy check", dict(model=model, n=n, sample_steps=pick("--sample-steps", sample_steps,
                                                                              "--steps", steps),
                                           guidance=guidance, seed=seed, device=device, dtype=dtype,
                                           threads=threads), set_)
    bundle = load_toy(cfg.model, device=cfg.device, dtype=cfg.dtype)
    kwargs = dict(n=cfg.n, seed=cfg.seed, steps=cfg.sample_steps, guidance=cfg.guidance)
    if quiet:
        res = measure(bundle, **kwargs)
    else:
        with _progress() as bar:
            task = bar.add_task("checks", total=4 * cfg.n, info="")
            res = measure(bundle, **kwargs, progress=lambda d, t: bar.update(task, completed=d))
    summary = {"figures": res.figures, "counts": res.counts, "seconds": round(res.seconds, 1)}
    if out is not None:
        Path(out).write_text(json.dumps(summary, indent=2) + "\n")
    if as_json:
        console.print_json(json.dumps(summary))
    elif quiet:
        console.print(f"figures in {out}" if out is not None else json.dumps(summary["figures"]))
    else:
        _print_summary(summary, Path(str(bundle.source)))
