"""The methods ``resalign compare`` knows: the registered method recipes (kind ``method``,
:class:`~resalign.components.MethodRecipe`; built-ins in :mod:`resalign.methods`: ``base``, the β = 0
baselines ``ga``, ``esd``, ``ca``, ResAlign and the Tab. 8 peers ``imma`` and ``meta-unlearning``), with
``NAME-LOSS`` (a recipe with ``loss_variants``: ``resalign-ga``) and ``NAME@SOLVER`` (one with
``solver_choice``: ``resalign@sam``, ``resalign-ga@trajectory``); the unlearning settings of each, their
roles in the report (:func:`method_roles`), and the checks of ``--methods`` and ``--run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resalign.components import MethodRecipe
from resalign.errors import ConfigError
from resalign.eval.protocol.matching import MATCH_MODES, candidate_runs


@dataclass(frozen=True)
class Method:
    """A ``--methods`` entry: its recipe and the harmful loss and solver its name picks."""

    name: str
    recipe: MethodRecipe
    loss: str | None = None
    solver: str | None = None


def _expected(registry: Any) -> str:
    infos = registry.infos("method")
    variants = [i.name for i in infos if i.component.loss_variants]
    choices = [i.name for i in infos if i.component.solver_choice]
    return (f"expected one of {', '.join(i.name for i in infos)}"
            + (f"; {'/'.join(variants)} may end in -LOSS" if variants else "")
            + (f", {'/'.join(choices)} in @SOLVER" if choices else "")
            + " (resalign plugins --kind method)")


def parse_method(method: str, registry: Any = None) -> Method:
    """The recipe of ``method`` (``NAME``, ``NAME-LOSS`` or either with ``@SOLVER``); ConfigError naming
    the known ones when there is none."""
    if registry is None:
        from resalign.registry import get_registry

        registry = get_registry()
    head, at, solver = method.partition("@")
    known = set(registry.names("method"))
    found: Method | None = None
    if head in known:
        found = Method(method, registry.get("method", head))
    else:
        parts = head.split("-")
        for i in range(1, len(parts)):
            prefix, loss = "-".join(parts[:i]), "-".join(parts[i:])
            if prefix in known and registry.get("method", prefix).loss_variants:
                found = Method(method, registry.get("method", prefix), loss=loss)
                break
    if found is None:
        raise ConfigError(f"method {method!r}: {_expected(registry)}")
    if at:
        if not found.recipe.solver_choice:
            raise ConfigError(f"method {method!r}: {head!r} fixes its solver, '@SOLVER' is for "
                              + ", ".join(i.name for i in registry.infos("method") if i.component.solver_choice))
        if not solver:
            raise ConfigError(f"method {method!r}: name a solver after '@' (e.g. resalign@sam)")
        found = Method(method, found.recipe, found.loss, solver)
    return found


def method_settings(method: str, model: str | None, seed: int, overrides: Mapping[str, Any], device: str,
                    dtype: str) -> dict[str, Any]:
    """The run settings (``RunConfig`` fields) that unlearn ``method``: ``overrides`` (``--unlearn-option``)
    with the model, seed, device and dtype, and the settings its recipe fixes (which win), its ``LOSS`` and
    ``SOLVER``. A recipe with β = 0 (Eq. 2) runs no simulation and drops the solver settings; one that
    fixes its solver drops the solver options given for every run."""
    m = parse_method(method)
    if not m.recipe.unlearns:
        raise ConfigError(f"method {method!r} is not unlearned (it is the model as loaded)")
    kw: dict[str, Any] = dict(overrides)
    for key in ("model", "seed", "device", "dtype", "loss", "beta"):
        if key in kw:
            raise ConfigError(f"--unlearn-option {key}=...: compare sets {key} itself (see --help)")
    if model is not None:
        kw["model"] = model
    kw.update(seed=seed, device=device, dtype=dtype)
    fixed = dict(m.recipe.settings)
    if m.loss:
        fixed["loss"] = m.loss
    if fixed.get("beta") == 0 or "solver" in fixed:
        # β = 0 runs no simulation; a recipe's own solver does not take ResAlign's options (e.g. rho for @sam)
        kw.pop("solver", None)
        kw.pop("solver_options", None)
    if m.solver:
        if "solver" in kw:
            raise ConfigError(f"method {method!r} names its solver: drop --unlearn-option solver=...")
        fixed["solver"] = m.solver
    kw.update(fixed)
    return kw


def is_released(path: str | Path) -> bool:
    """Whether a ``--run``/``NAME=PATH`` model is a released one (a model folder or a single checkpoint
    file) rather than a run directory of ``resalign run`` (which records its ``config.toml``)."""
    return not (Path(path) / "config.toml").is_file()


def with_released(cfg: Any) -> Any:
    """A ``CompareConfig`` whose ``--methods`` entries ``NAME=PATH`` (a released model: a model folder or a
    single-file UNet checkpoint in the original layout) are moved to ``runs``: ``NAME`` in ``methods``,
    ``runs[NAME] = PATH``. Unchanged when there are none."""
    import dataclasses

    released = {}
    for entry in cfg.methods:
        if "=" in entry:
            name, _, path = entry.partition("=")
            if not name or name != name.strip().lower() or not path or name == "base":
                raise ConfigError(f"--methods {entry!r}: expected NAME=PATH, NAME in lowercase and not 'base' "
                                  "(a released model folder or single-file checkpoint)")
            released[name] = path
    if not released:
        return cfg
    return dataclasses.replace(cfg, methods=[e.partition("=")[0] for e in cfg.methods], runs={**cfg.runs, **released})


def method_roles(methods: Sequence[str], losses: Mapping[str, str | None], released: Sequence[str] = ()
                 ) -> dict[str, dict[str, Any]]:
    """Each method's role in the report, from its recipe: ``ours``, ``matched`` (to ResAlign's strength),
    ``unlearns`` and ``twin`` (the β = 0 baseline paired with an ``ours`` method, its recipe's ``twin``
    with ``{loss}`` its resolved harmful loss ``losses[m]``; None when that baseline is not compared).
    A ``released`` model is compared as it is: not unlearned, not matched, ``released`` true."""
    roles: dict[str, dict[str, Any]] = {}
    for name in methods:
        if name in released:
            roles[name] = {"ours": False, "matched": False, "unlearns": False, "twin": None, "released": True}
            continue
        r = parse_method(name).recipe
        twin = r.twin.format(loss=losses.get(name)) if r.ours and r.twin and losses.get(name) else None
        roles[name] = {"ours": r.ours, "matched": r.matched, "unlearns": r.unlearns,
                       "twin": twin if twin in methods and twin != name else None}
    return roles


def method_run_config(method: str, model: str | None, seed: int, overrides: Mapping[str, Any], device: str, dtype: str):
    """The :class:`~resalign.settings.run.RunConfig` that unlearns ``method`` (:func:`method_settings`
    over the preset's tables)."""
    from resalign.config import from_dict
    from resalign.settings.run import RunConfig, with_preset_tables

    settings = with_preset_tables(method_settings(method, model, seed, overrides, device, dtype))
    return from_dict(RunConfig, settings, where="--unlearn-option")


def unlearning_configs(cfg: Any, roles: Mapping[str, Mapping[str, Any]], unlearn_seeds: Sequence[int],
                       reused_config: Callable[[str], Any] | None = None) -> dict[int, dict[str, Any]]:
    """The unlearning runs of a ``CompareConfig`` by unlearning seed and method, ResAlign first (its
    before-FT harmful rate is the strength the others are matched to): every method that unlearns and
    is not reused with ``--run``. With ``--match strength`` the matched methods' runs are the
    :func:`candidate_runs` of matching, at least ``--match-max-factor`` times ResAlign's outer steps,
    those of its run here or of the finished run ``--run`` reuses (``reused_config(DIR)``: the
    resolved configuration a run directory recorded; :func:`resalign.checkpoints.run_config_of`)."""
    from resalign.checkpoints import run_config_of
    from resalign.settings.run import resolve

    todo = sorted((m for m in cfg.methods if roles[m]["unlearns"] and m not in cfg.runs),
                  key=lambda m: not roles[m]["ours"])
    rcs = {u: {m: method_run_config(m, cfg.model, u, cfg.unlearn, cfg.device, cfg.dtype) for m in todo}
           for u in unlearn_seeds}
    if cfg.match != "strength":
        return rcs
    ours = next((m for m in cfg.methods if roles[m]["ours"]), None)
    if ours is None:
        ours_steps = None
    elif ours in cfg.runs:
        ours_steps = (reused_config or run_config_of)(cfg.runs[ours]).outer_steps
    else:
        ours_steps = resolve(rcs[unlearn_seeds[0]][ours]).outer_steps
    return {u: candidate_runs(by_method, lambda rc: resolve(rc).outer_steps, cfg.match_every, cfg.match_max_factor,
                              roles, ours_steps) for u, by_method in rcs.items()}


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
        if m in runs and is_released(runs[m]):
            continue
        try:
            parse_method(m)
        except ConfigError as exc:
            raise ConfigError("--methods " + str(exc).removeprefix("method ")) from None
    extra = sorted(set(runs) - set(methods))
    if extra:
        raise ConfigError(f"--run {', '.join(extra)}: not among --methods ({', '.join(methods)})")
    for m, path in runs.items():
        if is_released(path):
            _check_released(m, path, model)
            continue
        if not parse_method(m).recipe.unlearns:
            raise ConfigError(f"--run {m}=...: {m} is the model as loaded, --model")
        if not (Path(path) / "model" / "unet").is_dir() or not (Path(path) / "config.toml").is_file():
            raise ConfigError(f"--run {m}={path}: not a run directory (model/unet/ and config.toml)")
        source = made_from(Path(path))
        if not _same_model(source, model):
            raise ConfigError(f"--run {m}={path}: unlearned from {source or 'the toy model'!r}, "
                              f"but the base model here is {model or 'the toy model'!r}")


def _check_released(m: str, path: str, model: str | None) -> None:
    """A released model: a model folder, or a single-file checkpoint beside the base model folder."""
    from resalign.models.load import model_folder
    from resalign.models.single_file import check_single_file, is_single_file

    if is_single_file(path):
        check_single_file(path, model_folder(model))
    elif not Path(path).is_dir():
        raise ConfigError(f"{m}={path}: no such model folder or checkpoint file")
    else:
        model_folder(path)


def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return Path(a).resolve() == Path(b).resolve()


def describe_run(rc: Any) -> str:
    """The settings that tell the compared unlearning runs apart, of a resolved ``RunConfig``."""
    return ", ".join(f"{f}={getattr(rc, f)}" for f in ("loss", "beta", "alpha", "solver", "outer_steps"))
