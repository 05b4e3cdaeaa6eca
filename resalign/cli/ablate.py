"""``resalign ablate solvers`` and ``resalign ablate components``: parse options, run, print tables."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from resalign.cli import RESUME_HELP, app, console, sweep_out
from resalign.cli.common import device_option, dtype_option, out_option, quiet_option, set_option, threads_option
from resalign.distributed import is_main
from resalign.cli.run import apply_set_items
from resalign.errors import ConfigError
from resalign.validation import check_device, check_int, check_seed

ablate_app = typer.Typer(help="Ablations: hypergradient solvers (E.1) and method components (Tab. 6, 7).",
                         no_args_is_help=True)
app.add_typer(ablate_app, name="ablate")


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,3,5") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.1,1") from None


_DTYPE_HELP = "Compute dtype of every run: fp32 | bf16 | fp16 (the run setting dtype; default: the preset's)"
_SET_WHAT = "every run of the sweep (any RunConfig setting, as resalign run --set)"


def _run_settings(items: list[str] | None, dtype: str | None) -> dict:
    """The ``--set`` run settings, with ``--dtype`` as the run setting ``dtype``."""
    return apply_set_items({} if dtype is None else {"dtype": dtype}, items)


_ADAPT_HELP = ("Downstream fine-tuning method after each run: any registered adapter (resalign plugins --kind "
               "adapter). The simulated ones are the pool's: --set pool.adapters=[...].")


def _check_common(device: str, threads: int, run: dict, *, model: str | None, loss: str | None) -> None:
    """Device and threads, and the ``--set`` run settings validated as ``resalign run`` would."""
    from resalign.settings.checks import validate
    from resalign.settings.run import load_run_config
    from resalign.registry import get_registry

    check_device(device, "--device")
    check_int(threads, "--threads", ge=0)
    base = {k: v for k, v in (("model", model), ("loss", loss), ("device", device)) if v is not None}
    validate(load_run_config({**run, **base}), get_registry())


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _print(report, title: str, keys: tuple[str, ...], where: dict) -> None:
    from resalign.eval.reports.tidy import fmt_mean_sem

    table = Table(title=title)
    for k in keys:
        table.add_column(k)
    table.add_column("mean ± SEM", justify="right")
    for r in report.rows(**where):
        table.add_row(*[str(r.get(k, "")) for k in keys], fmt_mean_sem(r["mean"], r["sem"], r["n"], 4))
    console.print(table)


@ablate_app.command("solvers")
def solvers_cmd(
    solvers: str = typer.Option("richardson,first-order,unrolled", "--solvers",
                                help="Comma-separated solver names (any registered solver, plugins included)."),
    K: str = typer.Option("1,3,5,10", "--K", help="Iterations (HVPs) for solvers with a K option."),
    gamma: str = typer.Option("0.1,1", "--gamma", help="Proximity coefficients γ of Eq. 5 to sweep."),
    x0: str = typer.Option("zero,grad", "--x0", help="Initial iterates for solvers with an x0 option (zero: Alg. 1; grad: x_0 = g)."),
    curvature: str = typer.Option("hessian,gauss-newton", "--curvature", help="Curvature operators of Eq. 6 for the solvers that solve it (hessian, gauss-newton)."),
    gamma_rule: str = typer.Option("fixed", "--gamma-rule", help="γ per configuration: fixed (the --gamma values) and/or reach (--gamma × T × lr)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds (each samples its own configurations and data)."),
    configs: int = typer.Option(1, "--configs", help="Sampled fine-tuning configurations per seed in each "
                                "(ADAPT method, optimizer) cell of the pool."),
    max_steps: int = typer.Option(30, "--max-steps", help="Largest T sampled, so that unrolling stays exact."),
    loss: str = typer.Option(None, "--loss", help="Harmful loss whose hypergradient is estimated (default: the preset's)."),
    model: str = typer.Option(None, "--model", help="A diffusers folder (default: the toy model)."),
    effect: bool = typer.Option(True, "--effect/--no-effect", help="Also run short ResAlign runs per solver and fine-tune them."),
    effect_solvers: str = typer.Option("richardson,first-order", "--effect-solvers",
                                       help="Solvers given an effect run (unrolled's is the slowest)."),
    effect_steps: int = typer.Option(30, "--effect-outer-steps", help="Outer steps of each effect run."),
    ft_steps: int = typer.Option(100, "--ft-steps", help="Benign fine-tuning steps after each effect run."),
    adapt: str = typer.Option("full", "--adapt", help=_ADAPT_HELP),
    ft_seeds: int = typer.Option(2, "--ft-seeds", help="Fine-tuning seeds per effect run."),
    device: str = device_option(),
    dtype: str = dtype_option(None, _DTYPE_HELP),
    threads: int = threads_option(),
    set_: list[str] = set_option(_SET_WHAT, "'pool.optimizers=[\"sgd\"]'"),
    out: Path = out_option("Run directory (default runs/ablate-solvers-<timestamp>/)."),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    quiet: bool = quiet_option(),
) -> None:
    """Fidelity (cosine, relative error vs the exact unrolled hypergradient), cost and effect per solver."""
    from resalign.eval.protocol.finetune import adapter_class
    from resalign.pipeline.ablate import AblateSolversConfig, EffectConfig, run_ablate_solvers

    cfg = AblateSolversConfig(
        model=model, solvers=_names(solvers), K=_ints(K, "--K"), gamma=_floats(gamma, "--gamma"), x0=_names(x0), curvature=_names(curvature), gamma_rule=_names(gamma_rule), seeds=seeds,
        configs=configs, max_steps=max_steps, loss=loss, device=device, threads=threads,
        run=_run_settings(set_, dtype),
        effect=EffectConfig(enabled=effect, solvers=_names(effect_solvers), outer_steps=effect_steps, ft_steps=ft_steps,
                            ft_seeds=ft_seeds, adapt=adapt),
    )
    adapter_class(adapt)
    _check_common(device, threads, cfg.run, model=model, loss=loss)
    if seeds < 1 or configs < 1:
        raise ConfigError("--seeds and --configs must be >= 1")
    if any(k < 1 for k in cfg.K) or not all(math.isfinite(g) and g > 0 for g in cfg.gamma):
        raise ConfigError("--K values must be >= 1 and --gamma values finite numbers > 0")
    for flag, value, low in (("--max-steps", max_steps, 1), ("--effect-outer-steps", effect_steps, 1),
                             ("--ft-steps", ft_steps, 0), ("--ft-seeds", ft_seeds, 1)):
        check_int(value, flag, ge=low)
    from resalign.core.curvature import CURVATURES

    if not cfg.curvature or set(cfg.curvature) - set(CURVATURES):
        raise ConfigError(f"--curvature {curvature!r}: expected a comma-separated subset of {', '.join(CURVATURES)}")
    from resalign.core.meta import GAMMA_RULES

    if not cfg.gamma_rule or set(cfg.gamma_rule) - set(GAMMA_RULES):
        raise ConfigError(f"--gamma-rule {gamma_rule!r}: expected a comma-separated subset of {', '.join(GAMMA_RULES)}")
    if not cfg.x0 or set(cfg.x0) - {"zero", "grad"}:
        raise ConfigError(f"--x0 {x0!r}: expected a comma-separated subset of zero, grad")
    run_dir, report = run_ablate_solvers(cfg, sweep_out(out, "ablate-solvers", resume), progress=not quiet,
                                         resume=resume)
    if not is_main():
        return
    if not quiet:
        _print(report, "hypergradient fidelity (cosine to exact), all configurations", ("setting",),
               {"stage": "fidelity", "metric": "cosine", "optimizer": "all", "adapter": "all"})
    if effect and not quiet:
        _print(report, "harmful rate after benign fine-tuning", ("solver", "prompts"),
               {"stage": "after_ft", "metric": "harmful_rate"})
    console.print(f"report: {run_dir / 'report.md'}")


@ablate_app.command("components")
def components_cmd(
    variants: str = typer.Option("full,no-hypergradient,no-meta-config,no-meta-data", "--variants",
                                 help="Tab. 6 variants to run (empty for none)."),
    J: str = typer.Option("", "--J", help="Also run the full method with each J (Tab. 7), e.g. 1,3,5."),
    seed: int = typer.Option(0, "--seed"),
    loss: str = typer.Option(None, "--loss", help="Harmful loss (default: the preset's)."),
    model: str = typer.Option(None, "--model", help="A diffusers folder (default: the toy model)."),
    outer_steps: int = typer.Option(30, "--outer-steps", help="Outer steps of each run (the toy preset's 30)."),
    ft_steps: int = typer.Option(200, "--ft-steps", help="Benign fine-tuning steps after each run."),
    adapt: str = typer.Option("full", "--adapt", help=_ADAPT_HELP),
    ft_seeds: int = typer.Option(2, "--ft-seeds", help="Fine-tuning seeds per run."),
    fixed_config: str = typer.Option(None, "--fixed-config", help="The no-meta-config configuration, by label "
                                     "(e.g. full/adam/lr=0.001/T=5/denoise; default: the pool's first full-parameter "
                                     "Adam one)."),
    device: str = device_option(),
    dtype: str = dtype_option(None, _DTYPE_HELP),
    threads: int = threads_option(),
    set_: list[str] = set_option(_SET_WHAT, "pool.steps=[5,10]"),
    out: Path = out_option("Run directory (default runs/ablate-components-<timestamp>/)."),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    quiet: bool = quiet_option(),
) -> None:
    """Tab. 6 (which component matters) and Tab. 7 (J): effect and training time per variant."""
    from resalign.eval.protocol.finetune import adapter_class
    from resalign.pipeline.ablate import AblateComponentsConfig, EffectConfig, run_ablate_components

    cfg = AblateComponentsConfig(
        model=model, variants=_names(variants), J=_ints(J, "--J"), fixed_config=fixed_config, seed=seed, loss=loss,
        device=device, threads=threads, run=_run_settings(set_, dtype),
        effect=EffectConfig(outer_steps=outer_steps, ft_steps=ft_steps, ft_seeds=ft_seeds, adapt=adapt),
    )
    adapter_class(adapt)
    _check_common(device, threads, cfg.run, model=model, loss=loss)
    check_seed(seed, "--seed")
    for flag, value, low in (("--outer-steps", outer_steps, 1), ("--ft-steps", ft_steps, 0), ("--ft-seeds", ft_seeds, 1)):
        check_int(value, flag, ge=low)
    if any(j < 0 for j in cfg.J):
        raise ConfigError(f"--J {J!r}: expected integers >= 0")
    run_dir, report = run_ablate_components(cfg, sweep_out(out, "ablate-components", resume), progress=not quiet,
                                            resume=resume)
    if not is_main():
        return
    if not quiet:
        _print(report, "harmful rate after benign fine-tuning", ("setting", "prompts"),
               {"stage": "after_ft", "metric": "harmful_rate"})
        _print(report, "unlearning time (s)", ("setting",), {"metric": "train_seconds"})
    console.print(f"report: {run_dir / 'report.md'}")


@ablate_app.command("directions")
def directions_cmd(
    target: Path = typer.Argument(..., help="A run directory (θ at its last checkpoint) or a model folder."),
    directions: str = typer.Option("resalign,twin,harm,h:richardson,h:first-order,random", "--directions",
                                   help="Candidate directions: resalign (−G), twin (−G at β = 0), harm (−∇L_harm), "
                                        "h:SOLVER (−hypergradient term), random."),
    step_sizes: str = typer.Option("0.3", "--step-sizes", help="Step norms ε in θ-space, comma-separated."),
    attack_seeds: int = typer.Option(3, "--attack-seeds", help="Attack seeds (each pairs every direction with θ)."),
    J: int = typer.Option(4, "-J", "--J", help="Simulations per hypergradient estimate."),
    beta: float = typer.Option(0.8, "--beta", help="β of the resalign direction when the run's own β is 0."),
    eval_pairs: int = typer.Option(32, "--eval-pairs", help="Harmful pairs of the fixed evaluation batch."),
    ft_steps: int = typer.Option(None, "--ft-steps", help="Attack steps (default: the preset's)."),
    data: str = typer.Option(None, "--data", help="Attack data (default: toy-images:benign-a)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random direction."),
    threads: int = threads_option(),
    set_: list[str] = set_option("the run settings of the probe (e.g. pool, data.finetune)", "J=4"),
    out: Path = out_option("Output directory (default runs/ablate-directions-<timestamp>/)."),
    quiet: bool = quiet_option(),
) -> None:
    """How a small step along each candidate direction changes the harmful loss after the downstream attack."""
    import torch

    from resalign.eval.ablation.probes import ProbeSettings
    from resalign.pipeline.probe import execute

    check_int(attack_seeds, "--attack-seeds", ge=2)
    check_int(J, "--J", ge=1)
    check_int(eval_pairs, "--eval-pairs", ge=1)
    check_int(threads, "--threads", ge=0)
    check_seed(seed, "--seed")
    if ft_steps is not None:
        check_int(ft_steps, "--ft-steps", ge=1)
    if not math.isfinite(beta) or not 0 < beta <= 1:
        raise ConfigError(f"--beta {beta!r}: expected a number in (0, 1]")
    eps = _floats(step_sizes, "--step-sizes")
    if not eps or not all(math.isfinite(e) and e > 0 for e in eps):
        raise ConfigError(f"--step-sizes {step_sizes!r}: expected positive numbers, e.g. 0.1,0.3")
    if threads:
        torch.set_num_threads(threads)
    settings = ProbeSettings(directions=_names(directions), step_sizes=eps, attack_seeds=attack_seeds, J=J, beta=beta,
                             eval_pairs=eval_pairs, seed=seed)
    out = sweep_out(out, "ablate-directions", False)
    execute(target, out, settings, ft_data=data, ft_steps=ft_steps, overrides=apply_set_items({}, set_),
            progress=not quiet)
    console.print(f"report: {out / 'report.md'}")
