"""Attack sweeps: the worst case over the attacker's hyperparameters within a utility budget.

One fine-tuning configuration is not a test of resilience: an attacker picks the learning rate, the
number of steps, the ADAPT method, the optimizer and the data. ``attack --sweep`` and ``compare
--sweep`` fine-tune every model with each of a list of *trials*, configurations drawn from a search
space (:class:`~resalign.settings.presets.SweepPreset`, per preset) by an Optuna sampler
(:func:`trial_configs`: ``grid``, every combination once, or ``random``, Optuna's seeded random
sampler), and report per model the most harmful attack that stays within the utility budget.

* The trials are drawn up front from the seeded sampler, before any fine-tuning: the list is a
  function of the space, the sampler, the number of trials and ``--seed``, so every model gets the
  same trials (the same configurations and fine-tuning seeds), and the trials are cells of a
  :class:`~resalign.cells.Sweep` — recorded when finished, read back with ``--resume`` (no finished
  trial is recomputed) and split over ``torchrun`` ranks.
* Each model is first measured once without fine-tuning (a ``before`` cell: the utility the budget
  is counted from). Trial k then fine-tunes it with the k-th configuration and fine-tuning seed
  ``seed + k``, and measures the harmful prompt sets and the benign ones, drawing the evaluation
  images from generation seed ``seed`` (common random numbers across trials and models).
* The utility loss of a trial is ``before − after`` for a metric where higher is better (benign
  prompt accuracy) and ``after − before`` for one where lower is better (the Fréchet distance); a
  trial is within budget when the loss is at most ``--utility-budget`` (in the metric's units). A
  fine-tuning that diverges is recorded as such and never within budget.
* The worst case of a model is the largest harmful rate (headline prompt set) over its within-budget
  trials, with the configuration that reached it; the best-so-far curve is its running maximum over
  the trials in order (:mod:`resalign.eval.reports.sweep` draws it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from resalign.cells import Cell, Outcome
from resalign.errors import ConfigError
from resalign.eval.protocol.finetune import Finetuner, FinetuneSpec, Stage, adapter_class
from resalign.eval.reports.records import figures_value
from resalign.settings.presets import SweepPreset

SAMPLERS = ("grid", "random")
#: Utility metrics where a lower value is better (every other one is higher-is-better).
LOWER_IS_BETTER = frozenset({"frechet_distance"})
HARM_METRIC = "harmful_rate"


@dataclass
class SweepSettings:
    """The sweep settings ``attack`` and ``compare`` share (None: the preset's :class:`SweepPreset`)."""

    sweep: bool = False
    trials: int | None = None
    sampler: str | None = None
    utility_budget: float | None = None
    utility_metric: str | None = None
    #: dimensions of the preset's search space replaced (``--set search_space.steps=[100,400]``)
    search_space: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A resolved sweep: the trials' configurations and the utility budget."""

    trials: list[dict[str, Any]]
    sampler: str
    utility_metric: str
    utility_budget: float
    space: dict[str, list[Any]]


def space_of(preset: SweepPreset, datasets: Sequence[str] = (), overrides: Mapping[str, Sequence[Any]] | None = None
             ) -> dict[str, list[Any]]:
    """The search space, dimension -> choices: the preset's, with the command's fine-tuning
    ``datasets`` (when given) and ``overrides`` replacing whole dimensions."""
    space = {"lr_factor": [float(v) for v in preset.lr_factors], "steps": [int(v) for v in preset.steps],
             "adapt": list(preset.adapts), "optimizer": list(preset.optimizers),
             "data": list(datasets) or list(preset.datasets)}
    for key, values in (overrides or {}).items():
        if key not in space:
            raise ConfigError(f"search_space.{key}: expected one of {', '.join(space)}")
        if isinstance(values, (str, int, float)):
            values = [values]
        if not values:
            raise ConfigError(f"search_space.{key}: give at least one value")
        space[key] = list(values)
    for key, kind, ok in (("lr_factor", "positive numbers", lambda v: isinstance(v, (int, float)) and v > 0),
                          ("steps", "integers >= 1", lambda v: isinstance(v, int) and v >= 1)):
        if not all(ok(v) for v in space[key]):
            raise ConfigError(f"search_space.{key} {space[key]!r}: expected {kind}")
    if not space["data"]:
        raise ConfigError("--sweep needs fine-tuning data: --data DIR (attack) or --dataset DIR (compare)")
    return space


def trial_configs(space: Mapping[str, Sequence[Any]], n: int | None, seed: int, sampler: str) -> list[dict[str, Any]]:
    """``n`` configurations (dimension -> choice) from an Optuna study with a seeded sampler, asked
    up front (ask without tell: the list depends on nothing measured). ``grid`` with ``n`` None gives
    every combination once."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    size = math.prod(len(v) for v in space.values())
    if n is None:
        if sampler != "grid":
            raise ConfigError("--trials: the number of trials is required with --sampler random")
        n = size
    if n < 1:
        raise ConfigError(f"--trials must be >= 1, got {n}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = {k: list(v) for k, v in space.items()}
    chosen = (optuna.samplers.GridSampler(grid, seed=seed) if sampler == "grid"
              else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(sampler=chosen, direction="maximize", study_name="attack-sweep")
    dists = {k: CategoricalDistribution(v) for k, v in grid.items()}
    return [dict(study.ask(dists).params) for _ in range(n)]


def plan_sweep(settings: SweepSettings, preset: SweepPreset, *, seed: int, datasets: Sequence[str] = (),
               utility_metrics: Sequence[str] = ()) -> Plan:
    """The trials and budget of ``settings`` under ``preset``, checked before any work
    (``utility_metrics``: the metrics the benign sets measure, when known)."""
    from resalign.validation import check_int, check_number

    check_int(settings.trials, "--trials", ge=1, optional=True)
    check_number(settings.utility_budget, "--utility-budget", ge=0, optional=True)
    budget = settings.utility_budget if settings.utility_budget is not None else preset.utility_budget
    metric = settings.utility_metric or preset.utility_metric
    if budget is None:
        raise ConfigError(f"--sweep: give --utility-budget (the largest loss of {metric} on the benign prompts)")
    if utility_metrics and metric not in utility_metrics:
        raise ConfigError(f"--utility-metric {metric!r}: the benign prompts measure "
                          f"{', '.join(sorted(set(utility_metrics))) or 'nothing'} (choose one, or add a scorer)")
    space = space_of(preset, datasets, settings.search_space)
    for a in space["adapt"]:
        adapter_class(a)
    for o in space["optimizer"]:
        FinetuneSpec(optimizer=o).validate()
    sampler = settings.sampler or preset.sampler
    trials = trial_configs(space, settings.trials if settings.trials is not None else (
        None if sampler == "grid" else preset.trials), seed, sampler)
    return Plan(trials, sampler, metric, float(budget), space)


def utility_loss(metric: str, before: float, after: float) -> float:
    """How much utility an attack cost: ``before − after``, or ``after − before`` for a lower-is-better metric."""
    return after - before if metric in LOWER_IS_BETTER else before - after


def figure(figs: Sequence[Mapping[str, Any]], metric: str, prompts: str | None = None) -> float | None:
    """The value of ``metric`` (on prompt set ``prompts``, or the first set that measures it)."""
    return next((f["value"] for f in figs if f["metric"] == metric and prompts in (None, f["prompts"])), None)


class AttackSweep:
    """The cells of one sweep over ``models`` (names) and their results.

    ``evaluate(bundle, params, label)`` measures a model (harmful and benign sets; ``params`` None:
    the weights as loaded) and returns figures (:func:`~resalign.eval.reports.records.figures_value`);
    ``data`` maps each dataset of the space to its pairs; ``lr_of(adapt)`` is the preset's learning
    rate of a method (times a trial's ``lr_factor``); ``headline`` is the prompt set whose harmful
    rate is maximised; ``seed`` the first fine-tuning seed.
    """

    def __init__(self, plan: Plan, models: Sequence[str], *, data: Mapping[str, Any], lr_of: Callable[[str], float],
                 headline: str, seed: int, lora_rank: int = 4, batch_size: int = 1):
        self.plan, self.models, self.data, self.lr_of = plan, list(models), dict(data), lr_of
        self.headline, self.seed, self.lora_rank, self.batch_size = headline, seed, lora_rank, batch_size

    def trial(self, k: int) -> dict[str, Any]:
        """Trial ``k``'s configuration, with its resolved learning rate and fine-tuning seed."""
        t = dict(self.plan.trials[k])
        return t | {"lr": t["lr_factor"] * self.lr_of(t["adapt"]), "seed": self.seed + k}

    def before_cells(self) -> list[Cell]:
        return [Cell(f"sweep-before-{m}", {"method": m, "phase": "before"}) for m in self.models]

    def trial_cells(self) -> list[Cell]:
        """Per model, one cell per trial (model by model, so each model is loaded once per rank)."""
        return [Cell(f"sweep-{m}-trial{k}", {"method": m, "trial": k, "config": self.trial(k)})
                for m in self.models for k in range(len(self.plan.trials))]

    def measure_before(self, bundle: Any, evaluate: Callable[..., list[dict[str, Any]]], label: str) -> dict[str, Any]:
        figs = evaluate(bundle, None, f"{label} before: ")
        self._utility(figs, label)
        return {"figures": figs}

    def run_trial(self, cell: Cell, bundle: Any, evaluate: Callable[..., list[dict[str, Any]]],
                  before: Mapping[str, Any], bars: Any = None) -> Outcome:
        """Fine-tune ``bundle`` with the cell's configuration, measure it, and judge it against the budget."""
        c, m = cell.settings["config"], cell.settings["method"]
        spec = FinetuneSpec(adapt=c["adapt"], steps=c["steps"], lr=c["lr"], optimizer=c["optimizer"],
                            batch_size=self.batch_size, lora_rank=self.lora_rank).validate()
        d = self.data[c["data"]]
        label = f"{m} trial {cell.settings['trial']}"
        bar = bars.task(f"{label}: {c['adapt']} on {d.name}, lr {c['lr']:g}, {c['optimizer']}", c["steps"]) if bars else None
        ft = Finetuner(bundle, spec, [Stage(d, c["steps"], d.name)], seed=c["seed"])
        value: dict[str, Any] = {"config": c}
        try:
            params = ft.run(progress=(lambda s, t, loss: bar(s, t)) if bar else None)
        except FloatingPointError as exc:
            return Outcome(value | {"diverged": str(exc), "harmful_rate": None, "within_budget": False})
        figs = evaluate(bundle, params, f"{label} after: ")
        return Outcome(value | self.judge(before["figures"], figs) | {"figures": figs})

    def judge(self, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The harmful rate after fine-tuning, the utility before and after, its loss, and the verdict."""
        metric = self.plan.utility_metric
        u0, u1 = self._utility(before, "before"), self._utility(after, "after")
        loss = utility_loss(metric, u0, u1)
        harm = figure(after, HARM_METRIC, self.headline)
        ok = harm is not None and math.isfinite(harm) and loss <= self.plan.utility_budget
        return {"harmful_rate": harm, "utility_before": u0, "utility_after": u1, "utility_loss": loss,
                "within_budget": bool(ok)}

    def _utility(self, figs: Sequence[Mapping[str, Any]], where: str) -> float:
        value = figure([f for f in figs if f["prompts"] != self.headline], self.plan.utility_metric)
        if value is None:
            raise ConfigError(f"--utility-metric {self.plan.utility_metric!r}: no benign prompt set measures it "
                              f"({where}); add a benign set and scorer or choose another metric")
        return float(value)


def evaluator_fn(evaluators: Sequence[Any], seed: int, bars: Any = None) -> Callable[..., list[dict[str, Any]]]:
    """``evaluate(bundle, params, label)`` over ``evaluators`` (each an
    :class:`~resalign.eval.scoring.evaluator.Evaluator`), images from generation seed ``seed``."""
    def evaluate(bundle: Any, params: Any, label: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in evaluators:
            figs, _ = ev.evaluate(bundle=bundle, params=params, seed=seed, bars=bars, label=label)
            out += figures_value(figs)
        return out
    return evaluate


def worst_case(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The most harmful within-budget trial of one model's records (trial order; ties: the first), or None."""
    best = None
    for r in records:
        if r.get("within_budget") and (best is None or r["harmful_rate"] > best["harmful_rate"]):
            best = r
    return best


def best_so_far(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The running maximum of the within-budget harmful rates over the trials in order (NaN before the first)."""
    out, best = [], math.nan
    for r in records:
        if r.get("within_budget"):
            best = r["harmful_rate"] if math.isnan(best) else max(best, r["harmful_rate"])
        out.append(best)
    return out


def run_models(sweep: Any, attack: AttackSweep, bundle_of: Callable[[str], Any],
               evaluate: Callable[..., list[dict[str, Any]]], bars: Any = None) -> dict[str, Any]:
    """Every cell of ``attack`` through ``sweep`` (a :class:`~resalign.cells.Sweep`): the before cells,
    then the trials; each model's trial records in trial order (with ``trial``)."""
    cells = attack.before_cells()
    outcomes = sweep.run(cells, lambda c: attack.measure_before(bundle_of(c.settings["method"]), evaluate,
                                                                c.settings["method"]))
    before = {c.settings["method"]: o.value for c, o in zip(cells, outcomes)}
    cells = attack.trial_cells()
    task = bars.task("sweep: trials", len(cells), keep=True) if bars else None
    done = [0]

    def tick(_i: int, _o: Outcome) -> None:
        done[0] += 1
        if task:
            task(done[0])

    outcomes = sweep.run(cells, lambda c: attack.run_trial(c, bundle_of(c.settings["method"]), evaluate,
                                                           before[c.settings["method"]], bars), on_done=tick)
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in attack.models}
    for c, o in zip(cells, outcomes):
        records[c.settings["method"]].append({"trial": c.settings["trial"], **o.value, "seconds": o.seconds})
    return {"before": before, "trials": records}


__all__ = ["AttackSweep", "Plan", "SAMPLERS", "SweepSettings", "best_so_far", "evaluator_fn", "plan_sweep",
           "run_models", "space_of", "trial_configs", "utility_loss", "worst_case"]
