"""The methods ``resalign compare`` knows: ``base`` (the model as loaded), the plain-unlearning
baselines (β = 0 in Eq. 3, i.e. Eq. 2's L_harm + α·R, each with its own harmful loss: GA, ESD, CA) and
ResAlign (Alg. 2, ``resalign`` or ``resalign-LOSS``; ``@SOLVER`` picks its hypergradient solver, e.g.
``resalign@sam`` or ``resalign-ga@trajectory``); the unlearning settings of each, and the checks of
``--methods`` and ``--run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from resalign.errors import ConfigError
from resalign.eval.reports.compare import BASELINE_LOSSES, is_ours
from resalign.eval.protocol.matching import MATCH_MODES

_EXPECTED = f"expected base, {', '.join(BASELINE_LOSSES)}, resalign or resalign-LOSS (either may end in @SOLVER)"


def method_settings(method: str, model: str | None, seed: int, overrides: Mapping[str, Any], device: str,
                    dtype: str) -> dict[str, Any]:
    """The run settings (``RunConfig`` fields) that unlearn ``method``: ``overrides`` (``--unlearn-option``)
    with the model, seed, device and dtype, and β = 0 and the baseline's loss (without the solver
    settings, which β = 0 never uses), or ResAlign's ``LOSS`` and ``SOLVER``."""
    kw: dict[str, Any] = dict(overrides)
    for key in ("model", "seed", "device", "dtype", "loss", "beta"):
        if key in kw:
            raise ConfigError(f"--unlearn-option {key}=...: compare sets {key} itself (see --help)")
    if model is not None:
        kw["model"] = model
    kw.update(seed=seed, device=device, dtype=dtype)
    if method in BASELINE_LOSSES:
        # β = 0 runs no simulation: the solver settings are ResAlign's (e.g. rho for resalign@sam)
        kw.pop("solver", None)
        kw.pop("solver_options", None)
        kw.update(loss=method, beta=0.0)
    elif is_ours(method):
        name, _, solver = method.partition("@")
        if "-" in name:
            kw["loss"] = name.split("-", 1)[1]
        if "@" in method and not solver:
            raise ConfigError(f"method {method!r}: name a solver after '@' (e.g. resalign@sam)")
        if solver:
            if "solver" in kw:
                raise ConfigError(f"method {method!r} names its solver: drop --unlearn-option solver=...")
            kw["solver"] = solver
    else:
        raise ConfigError(f"method {method!r}: {_EXPECTED}")
    return kw


def check_comparison(cfg: Any, made_from: Callable[[Path], str | None]) -> None:
    """The checks of a ``CompareConfig`` before any work: seed counts, ``--match``, and
    :func:`check_methods` (``made_from(DIR)``: the model a reused run names)."""
    if cfg.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.unlearn_seeds < 1:
        raise ConfigError(f"--unlearn-seeds must be >= 1, got {cfg.unlearn_seeds}")
    if cfg.unlearn_seeds > 1 and cfg.runs:
        raise ConfigError(f"--run {', '.join(cfg.runs)}: a finished run has one unlearning seed, "
                          f"--unlearn-seeds {cfg.unlearn_seeds} needs every method unlearned here")
    if cfg.match not in MATCH_MODES:
        raise ConfigError(f"--match {cfg.match!r}: expected one of {', '.join(MATCH_MODES)}")
    check_methods(cfg.methods, cfg.runs, cfg.model, made_from)
    if cfg.match == "strength" and cfg.match_max_factor < 1:
        raise ConfigError(f"--match-max-factor must be >= 1, got {cfg.match_max_factor}")


def check_methods(methods: Sequence[str], runs: Mapping[str, str], model: str | None,
                  made_from: Callable[[Path], str | None]) -> None:
    """``--methods`` names known methods once each; every ``--run METHOD=DIR`` is one of them, a run
    directory, and was unlearned from the base model ``model`` (``made_from(DIR)``: the model it names)."""
    if not methods:
        raise ConfigError("--methods: nothing to compare")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {', '.join(methods)}")
    for m in methods:
        if m != "base" and m not in BASELINE_LOSSES and not is_ours(m):
            raise ConfigError(f"--methods {m!r}: {_EXPECTED}")
    extra = sorted(set(runs) - set(methods))
    if extra:
        raise ConfigError(f"--run {', '.join(extra)}: not among --methods ({', '.join(methods)})")
    for m, path in runs.items():
        if m == "base":
            raise ConfigError("--run base=...: the base model is --model")
        if not (Path(path) / "model" / "unet").is_dir() or not (Path(path) / "config.toml").is_file():
            raise ConfigError(f"--run {m}={path}: not a run directory (model/unet/ and config.toml)")
        source = made_from(Path(path))
        if not _same_model(source, model):
            raise ConfigError(f"--run {m}={path}: unlearned from {source or 'the toy model'!r}, "
                              f"but the base model here is {model or 'the toy model'!r}")


def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return Path(a).resolve() == Path(b).resolve()


def describe_run(rc: Any) -> str:
    """The settings that tell the compared unlearning runs apart, of a resolved ``RunConfig``."""
    return ", ".join(f"{f}={getattr(rc, f)}" for f in ("loss", "beta", "alpha", "solver", "outer_steps"))
