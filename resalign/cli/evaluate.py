"""``resalign eval``, ``score``, ``attack`` and ``compare``: parse options, run the pipeline, print tables."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from resalign.cli import RESUME_HELP, app, console, sweep_out
from resalign.cli.common import (alias_option, device_option, dtype_option, out_option, pick, quiet_option, refuse,
                                 resolve, set_option, set_torch_threads, threads_option)
from resalign.distributed import is_main
from resalign.errors import ConfigError

_OUT_HELP = "Run directory (default runs/<command>-<timestamp>/)."
_GEN_HELP = {
    "images_per_prompt": "Images per prompt (toy 1, sd 3).",
    "sample_steps": "Sampling (DDIM) steps of the evaluation (toy 20, sd 30).",
    "guidance": "Classifier-free guidance scale of the evaluation (toy 2, sd 7.5).",
}
_SCORER_OPTION_HELP = (
    "A scorer option NAME.KEY=VALUE (e.g. nudenet.threshold=0.45, toy-harm.classifier=harm.onnx); "
    "KEY=VALUE when one scorer is used. Repeatable."
)


_SWEEP_HELP = {
    "sweep": "Attack sweep: fine-tune with every trial of the preset's search space (lr, steps, ADAPT method, "
             "optimizer, data) and report the worst-case harmful rate within --utility-budget.",
    "trials": "Trials of --sweep (default: the preset's; --sampler grid: the whole grid).",
    "sampler": "How --sweep draws its trials: random (Optuna's seeded random sampler) | grid (default: the preset's).",
    "budget": "Largest utility loss an attack of --sweep may cost on the benign prompts, in the metric's units "
              "(toy default 0.1 of prompt accuracy).",
    "metric": "Utility metric of --utility-budget: prompt_accuracy | frechet_distance (default: the preset's).",
}


def sweep_options() -> dict:
    """The typer options of ``--sweep`` that ``attack`` and ``compare`` share."""
    return dict(
        sweep=typer.Option(False, "--sweep", help=_SWEEP_HELP["sweep"]),
        trials=typer.Option(None, "--trials", help=_SWEEP_HELP["trials"]),
        sampler=typer.Option(None, "--sampler", help=_SWEEP_HELP["sampler"]),
        utility_budget=typer.Option(None, "--utility-budget", help=_SWEEP_HELP["budget"]),
        utility_metric=typer.Option(None, "--utility-metric", help=_SWEEP_HELP["metric"]),
    )


_SW = sweep_options()


def _out(out: Path | None, command: str) -> Path:
    from resalign.rundir import default_out

    return Path(out) if out is not None else default_out(command)


def _split(values: list[str] | None) -> list[str]:
    """Repeatable options that also accept comma-separated lists."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def scorer_options(items: list[str] | None, scorers: list[str], fallback: str | None = None) -> dict[str, dict]:
    """``["nudenet.threshold=0.45"]`` -> ``{"nudenet": {"threshold": 0.45}}`` (values: :func:`resalign.config.parse_value`).

    A bare ``KEY=VALUE`` belongs to the single scorer in use (``--scorer``, or ``fallback``).
    """
    from resalign.config import parse_value

    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--scorer-option {item!r}: expected NAME.KEY=VALUE")
        name, dot, opt = key.strip().rpartition(".")
        if not dot:
            names = scorers or ([fallback] if fallback else [])
            if len(names) != 1:
                raise ConfigError(f"--scorer-option {item!r}: name the scorer, as {'NAME.' + key.strip() + '=' + value!r}")
            name, opt = names[0], key.strip()
        if not name.strip() or not opt.strip():
            raise ConfigError(f"--scorer-option {item!r}: expected NAME.KEY=VALUE with a scorer name and an option")
        out.setdefault(name.strip(), {})[opt.strip()] = parse_value(value, f"--scorer-option {item!r}")
    return out


def _print_rows(report, keys: tuple[str, ...], title: str) -> None:
    from resalign.eval.reports.tidy import fmt_mean_sem

    table = Table(title=title)
    for k in keys:
        table.add_column(k)
    table.add_column("mean ± SEM", justify="right")
    table.add_column("n", justify="right")
    for r in report.results:
        table.add_row(*[str(r.get(k, "")) for k in keys], fmt_mean_sem(r["mean"], r["sem"], r["n"], 4), str(r["n"]))
    console.print(table)


# --------------------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(None, help="A diffusers model folder or a run directory (its model/). Default: the toy base model."),
    prompts: Path = typer.Option(None, "--prompts", help="Prompt file: text (one a line) or CSV with I2P columns. Default: the toy prompt sets."),
    scorer: list[str] = typer.Option(None, "--scorer", help="Scorer(s) to run on every set (repeatable). Default: per set, toy-harm / toy-prompt-accuracy / toy-frechet, or nudenet for real models."),
    scorer_option: list[str] = typer.Option(None, "--scorer-option", help=_SCORER_OPTION_HELP),
    category: list[str] = typer.Option(None, "--category", help="Keep CSV prompts of these categories (I2P 'categories'), e.g. sexual."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N prompts of each set."),
    images_per_prompt: int = typer.Option(None, "--images-per-prompt", help=_GEN_HELP["images_per_prompt"]),
    sample_steps: int = typer.Option(None, "--sample-steps", help=_GEN_HELP["sample_steps"]),
    steps: int = alias_option("--steps"),
    guidance: float = typer.Option(None, "--guidance", help=_GEN_HELP["guidance"] + " I2P's evaluation_guidance wins."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (added to I2P's evaluation_seed)."),
    seeds: int = typer.Option(1, "--seeds", help="Repeat with this many seeds; rows report mean ± SEM."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images generated per batch."),
    toy_prompts: int = typer.Option(None, "--toy-prompts", help="Prompts drawn per toy set (default 100)."),
    save_images: bool = typer.Option(True, "--save-images/--no-save-images", help="Save every generated image."),
    preset: str = typer.Option(None, "--preset", help="toy | sd (also called paper): generation settings and default scorers (default: toy for the toy model, else sd)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    threads: int = threads_option(),
    set_: list[str] = set_option("the evaluation (a field of EvalConfig)", "sample_steps=10"),
    out: Path = out_option(_OUT_HELP),
    quiet: bool = quiet_option(),
) -> None:
    """Generate images from prompt sets, score them and write a report (harmful rate, utility)."""
    from resalign.pipeline.evaluate import EvalConfig, run_eval

    names = _split(scorer)
    cfg = resolve(EvalConfig, "eval", dict(
        model=model, prompts=str(prompts) if prompts else None, scorers=names,
        scorer_options=scorer_options(scorer_option, names), category=_split(category), limit=limit,
        images_per_prompt=images_per_prompt, sample_steps=pick("--sample-steps", sample_steps, "--steps", steps),
        guidance=guidance, seed=seed, seeds=seeds, batch_size=batch_size, toy_prompts=toy_prompts, device=device,
        dtype=dtype, save_images=save_images, threads=threads, preset=preset,
    ), set_)
    path, report = run_eval(cfg, _out(out, "eval"), progress=not quiet)
    if is_main():  # under torchrun the other ranks only generated
        if not quiet:
            _print_rows(report, ("prompts", "metric", "scorer"), f"resalign eval: {report.settings['model']}")
        console.print(f"report: {path / 'report.md'}")


# --------------------------------------------------------------------------- score


@app.command("score")
def score_cmd(
    images: Path = typer.Argument(..., help="Folder of images (PNG/JPEG/WebP; metadata.jsonl captions are used when present)."),
    scorer: str = typer.Option("nudenet", "--scorer", help="Scorer name (see `resalign plugins --kind scorer`)."),
    scorer_option: list[str] = typer.Option(None, "--scorer-option", help="KEY=VALUE option of the scorer. Repeatable."),
    strict_images: bool = typer.Option(False, "--strict-images", help="Refuse a folder with an unreadable image "
                                       "file (default: warn, skip such files and score the rest)."),
    device: str = device_option(None, "Device of the scorer's network, its 'device' option (for scorers that have "
                                "one: clip-score, frechet, unsafe-score, ...)"),
    dtype: str = dtype_option(None, "Not used: scorers run in their own precision; giving it is an error"),
    threads: int = threads_option(None, "Torch CPU threads while scoring (0: torch's default)"),
    set_: list[str] = set_option("the scoring (a field of ScoreConfig)", "scorer_options.threshold=0.5"),
    out: Path = out_option(_OUT_HELP),
    quiet: bool = quiet_option(),
) -> None:
    """Score existing images: per-image results (detections.jsonl or scores.csv) and the aggregate report."""
    import dataclasses

    from resalign.pipeline.evaluate import ScoreConfig, run_score
    from resalign.registry import get_registry

    refuse("score", "--dtype", dtype, "scorers run in their own precision (--dtype is for generating images)")
    all_opts = scorer_options(scorer_option, [scorer])
    other = sorted(set(all_opts) - {scorer})
    if other:
        raise ConfigError(f"--scorer-option for {', '.join(other)}: that scorer is not used (--scorer {scorer})")
    cfg = resolve(ScoreConfig, "score", dict(images=str(images), scorer=scorer, scorer_options=all_opts.get(scorer, {}),
                                             strict_images=strict_images), set_)
    if device is not None:
        from resalign.validation import check_device

        check_device(device, "--device")
        config = getattr(get_registry().get("scorer", cfg.scorer), "Config", None)
        if config is None or "device" not in {f.name for f in dataclasses.fields(config)}:
            raise ConfigError(f"score --device: scorer {cfg.scorer!r} has no device option (it chooses where it runs)")
        cfg = dataclasses.replace(cfg, scorer_options={"device": device, **cfg.scorer_options})
    set_torch_threads(threads)
    path, report = run_score(cfg, _out(out, "score"))
    if not quiet:
        _print_rows(report, ("dataset", "metric", "scorer"), f"resalign score: {images}")
    console.print(f"report: {path / 'report.md'}")


# --------------------------------------------------------------------------- attack


@app.command("attack")
def attack_cmd(
    model: str = typer.Argument(None, help="A diffusers model folder or a run directory (its model/). Default: the toy base model."),
    adapt: str = typer.Option("full", "--adapt", help="Any registered adapter (resalign plugins --kind adapter): full, lora, loha, lokr, svdiff, custom_diffusion, dreambooth, ..."),
    data: list[str] = typer.Option(None, "--data", help="Fine-tuning image-caption folder (metadata.jsonl), or a toy set toy-images:benign-a|benign-b|contamination. A second --data is the second benign stage of --progressive."),
    ft_steps: int = typer.Option(None, "--ft-steps", help="Fine-tuning steps (default 200)."),
    steps: int = alias_option("--steps"),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default: the preset's for the method; paper full 1e-5)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adam | sgd."),
    batch_size: int = typer.Option(1, "--batch-size", help="Fine-tuning batch size (paper: 1)."),
    seeds: int = typer.Option(3, "--seeds", help="Independent fine-tuning runs (mean ± SEM)."),
    seed: int = typer.Option(0, "--seed", help="First seed."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps (default 50; 0: only before and after)."),
    preset: str = typer.Option(None, "--preset", help="sd (also called paper) | toy (default: toy for the toy model, else sd)."),
    contaminate: float = typer.Option(None, "--contaminate", help="Share of fine-tuning pairs replaced by --harmful-data pairs (Fig. 4)."),
    harmful_data: str = typer.Option(None, "--harmful-data", help="Harmful image-caption folder (or toy-images:contamination)."),
    escape: str = typer.Option(None, "--escape", help="Parameter-space escape p=1|2,lambda=0.5 (Tab. 11)."),
    progressive: bool = typer.Option(False, "--progressive", help="Staged relearning: benign, benign, milder harmful half, all harmful (Fig. 7)."),
    prompts: Path = typer.Option(None, "--prompts", help="Harmful prompt file for the evaluation (default: toy harmful and implicit sets)."),
    benign_prompts: Path = typer.Option(None, "--benign-prompts", help="Benign prompt file, evaluated before and after (utility)."),
    category: list[str] = typer.Option(None, "--category", help="Keep CSV prompts of these categories."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N prompts of each set."),
    scorer: list[str] = typer.Option(None, "--scorer", help="Scorer(s) for the evaluation sets."),
    scorer_option: list[str] = typer.Option(None, "--scorer-option", help=_SCORER_OPTION_HELP),
    images_per_prompt: int = typer.Option(None, "--images-per-prompt", help=_GEN_HELP["images_per_prompt"]),
    sample_steps: int = typer.Option(None, "--sample-steps", help=_GEN_HELP["sample_steps"]),
    guidance: float = typer.Option(None, "--guidance", help=_GEN_HELP["guidance"]),
    toy_prompts: int = typer.Option(None, "--toy-prompts", help="Prompts per toy set (default 100)."),
    lora_rank: int = typer.Option(4, "--lora-rank"),
    prior_data: str = typer.Option(None, "--prior-data", help="DreamBooth class images (default: generated by the model)."),
    class_prompt: str = typer.Option(None, "--class-prompt", help="DreamBooth class prompt (default: each caption)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    threads: int = threads_option(),
    sweep: bool = _SW["sweep"],
    trials: int = _SW["trials"],
    sampler: str = _SW["sampler"],
    utility_budget: float = _SW["utility_budget"],
    utility_metric: str = _SW["utility_metric"],
    set_: list[str] = set_option("the attack (a field of AttackConfig)", "gen_batch_size=16"),
    out: Path = out_option(_OUT_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    quiet: bool = quiet_option(),
) -> None:
    """Fine-tune the model as a downstream user would and report its harmful rate along the way (Fig. 2)."""
    from resalign.pipeline.attack import AttackConfig, run_attack

    names = _split(scorer)
    cfg = resolve(AttackConfig, "attack", dict(
        model=model, adapt=adapt, data=list(data or []), ft_steps=pick("--ft-steps", ft_steps, "--steps", steps),
        lr=lr, optimizer=optimizer, batch_size=batch_size, seeds=seeds, seed=seed, eval_every=eval_every,
        preset=preset, contaminate=contaminate, harmful_data=harmful_data, escape=escape, progressive=progressive,
        prompts=str(prompts) if prompts else None, benign_prompts=str(benign_prompts) if benign_prompts else None,
        category=_split(category), limit=limit, scorers=names,
        scorer_options=scorer_options(scorer_option, names), images_per_prompt=images_per_prompt,
        sample_steps=sample_steps, guidance=guidance, toy_prompts=toy_prompts, lora_rank=lora_rank,
        prior_data=prior_data, class_prompt=class_prompt, device=device, dtype=dtype, threads=threads,
        sweep=sweep, trials=trials, sampler=sampler, utility_budget=utility_budget, utility_metric=utility_metric,
    ), set_)
    path, report = run_attack(cfg, sweep_out(out, "attack", resume), progress=not quiet, resume=resume)
    if not is_main():
        return
    if not quiet:
        if sweep:
            _print_sweep(report)
        else:
            _print_rows(report, ("stage", "step", "prompts", "metric"), f"resalign attack: {report.settings['model']}")
    console.print(f"report: {path / 'report.md'}")


def _print_sweep(report) -> None:
    """The worst case per model of an attack sweep (``report.md`` holds every trial)."""
    from rich.markdown import Markdown

    from resalign.eval.reports.sweep import worst_case_rows

    console.print(Markdown(worst_case_rows(report).render()))


# --------------------------------------------------------------------------- compare


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{flag} {item!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


@app.command("compare")
def compare_cmd(
    model: str = typer.Option(None, "--model", help="Base model folder (default: the toy base model)."),
    methods: list[str] = typer.Option(None, "--methods", help="Comma-separated method recipes (resalign plugins --kind method): base, ga, esd, ca (beta = 0 baselines), resalign[-LOSS][@SOLVER] (e.g. resalign@sam), imma[-LOSS], meta-unlearning[-LOSS] (Tab. 8 peers), a plugin's; or NAME=PATH, a released model folder or single-file UNet checkpoint (.safetensors/.ckpt, original layout, on --model's other parts). Default: base,ga,esd,ca,resalign."),
    run: list[str] = typer.Option(None, "--run", help="Reuse a finished unlearning run: METHOD=RUN_DIR (repeatable)."),
    unlearn_option: list[str] = typer.Option(None, "--unlearn-option", help="A run setting for every unlearning run, KEY=VALUE (e.g. outer_steps=20); the same as --set unlearn.KEY=VALUE. Repeatable."),
    dataset: list[str] = typer.Option(None, "--dataset", help="Benign fine-tuning set (folder or toy-images:NAME), twice. Default toy: benign-a, benign-b."),
    adapt: str = typer.Option("full", "--adapt", help="Fine-tuning method after unlearning (paper: full)."),
    ft_steps: int = typer.Option(None, "--ft-steps", help="Fine-tuning steps (default 200)."),
    lr: float = typer.Option(None, "--lr", help="Fine-tuning learning rate (default: the preset's)."),
    optimizer: str = typer.Option("adamw", "--optimizer"),
    seeds: int = typer.Option(3, "--seeds", help="Independent fine-tuning runs / evaluation seeds."),
    seed: int = typer.Option(0, "--seed"),
    unlearn_seeds: int = typer.Option(1, "--unlearn-seeds", help="Unlearn every method this many times (run seeds SEED, SEED+1, ...), each model then fine-tuned with every --seeds seed: figures are mean ± SEM over all (unlearning seed, fine-tuning seed) pairs."),
    prompts: Path = typer.Option(None, "--prompts", help="Harmful prompt file (default: toy harmful and implicit sets)."),
    benign_prompts: Path = typer.Option(None, "--benign-prompts", help="Benign prompt file for utility."),
    category: list[str] = typer.Option(None, "--category"),
    limit: int = typer.Option(None, "--limit"),
    scorer: list[str] = typer.Option(None, "--scorer"),
    scorer_option: list[str] = typer.Option(None, "--scorer-option", help=_SCORER_OPTION_HELP),
    toy_prompts: int = typer.Option(None, "--toy-prompts", help="Prompts per toy set and seed (default 40)."),
    images_per_prompt: int = typer.Option(None, "--images-per-prompt", help=_GEN_HELP["images_per_prompt"]),
    sample_steps: int = typer.Option(None, "--sample-steps", help="Sampling (DDIM) steps of the evaluation (toy default 10)."),
    guidance: float = typer.Option(None, "--guidance", help=_GEN_HELP["guidance"]),
    match: str = typer.Option("strength", "--match", help="strength: each baseline at its earliest checkpoint as unlearned as ResAlign (of the same unlearning seed); steps: final models of equal-length runs, with the paired difference ResAlign - beta = 0 twin."),
    match_every: int = typer.Option(2, "--match-every", help="Checkpoint interval (outer steps) of the baselines' runs for --match strength."),
    match_max_factor: int = typer.Option(1, "--match-max-factor", help="With --match strength, baselines run up to this many times ResAlign's outer steps."),
    results_md: Path = typer.Option(None, "--results-md", help="Also write the table to this Markdown file (docs/results.md)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    threads: int = threads_option(),
    sweep: bool = _SW["sweep"],
    trials: int = _SW["trials"],
    sampler: str = _SW["sampler"],
    utility_budget: float = _SW["utility_budget"],
    utility_metric: str = _SW["utility_metric"],
    set_: list[str] = set_option("the comparison (a field of CompareConfig; unlearn.KEY: a run setting)",
                                 "unlearn.outer_steps=20"),
    out: Path = out_option(_OUT_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    quiet: bool = quiet_option(),
) -> None:
    """Table 1: base, plain-unlearning baselines and ResAlign, before and after benign fine-tuning."""
    from resalign.config import parse_items
    from resalign.pipeline.compare import CompareConfig, check_compare_config, run_compare
    from resalign.settings.run import RunConfig

    names = _split(scorer)
    cfg = resolve(CompareConfig, "compare", dict(
        model=model, methods=_split(methods) or None, runs=_pairs(run, "--run"),
        unlearn=parse_items(unlearn_option, "--unlearn-option", cls=RunConfig, what="the run settings"), datasets=list(dataset or []), adapt=adapt,
        ft_steps=ft_steps, lr=lr, optimizer=optimizer, seeds=seeds, seed=seed, unlearn_seeds=unlearn_seeds,
        prompts=str(prompts) if prompts else None, benign_prompts=str(benign_prompts) if benign_prompts else None,
        category=_split(category), limit=limit, scorers=names, scorer_options=scorer_options(scorer_option, names),
        toy_prompts=toy_prompts, images_per_prompt=images_per_prompt, sample_steps=sample_steps, guidance=guidance,
        device=device, dtype=dtype, threads=threads, results_md=str(results_md) if results_md else None,
        match=match, match_every=match_every, match_max_factor=match_max_factor,
        sweep=sweep, trials=trials, sampler=sampler, utility_budget=utility_budget, utility_metric=utility_metric,
    ), set_)
    check_compare_config(cfg)
    path, report = run_compare(cfg, sweep_out(out, "compare", resume), progress=not quiet, resume=resume)
    if not is_main():
        return
    if not quiet and sweep:
        _print_sweep(report)
    elif not quiet:
        from rich.markdown import Markdown

        from resalign.eval.reports.compare import compare_tables

        for table in compare_tables(report):
            console.print(Markdown(table.render()))
    console.print(f"report: {path / 'report.md'}  ({report.settings['seconds'] / 60:.1f} min)")
