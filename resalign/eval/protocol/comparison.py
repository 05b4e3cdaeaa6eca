"""The measurements of ``resalign compare`` (Tab. 1): strength matching, then every model before and
after benign fine-tuning, as cells whose outcomes become the tidy report's rows.

Unlearning seeds (``--unlearn-seeds N``, 1 by default). Every non-base method is unlearned N times,
with the run seeds ``seed, …, seed+N−1``, and each of the N unlearned models is measured before
fine-tuning and fine-tuned and measured after with the S fine-tuning seeds ``seed, …, seed+S−1``
(``--seeds``; the k-th also draws the evaluation images from generation seed ``seed + k·SEED_STRIDE``).
The generated training data depend on the run seed, so they are shared only between the methods of
one unlearning seed: each seed's ResAlign and its β = 0 baselines learn from the same pairs.

Report layout: one tidy row per figure (model, stage, finetune, dataset, prompts, metric, scorer), as
every command writes. Its ``values`` are ordered by unlearning seed, then fine-tuning seed:
``values[i·S + k]`` was measured on the model of unlearning seed ``unlearn_seeds[i]`` with fine-tuning
seed ``ft_seeds[k]``, both lists part of the row (the base model's rows carry ``ft_seeds`` only, and a
reused ``--run`` its own seed). ``mean`` and ``sem`` are over all N·S values, SEM = s/√(N·S) with s
their sample standard deviation (ddof=1): s holds the variance between unlearning runs and between
fine-tuning runs, and each (unlearning seed, fine-tuning seed) pair counts as one replicate.
``settings.unlearn_seeds`` lists the unlearning seeds; ``settings.unlearning`` and ``run_dirs`` are
those of the first, and with several seeds ``unlearning_by_seed``, ``run_dirs_by_seed`` and
``matching.by_unlearn_seed`` hold every seed's, keyed by seed.

Paired difference (``--match steps``). ResAlign's β = 0 twin is the baseline whose resolved harmful
loss is ResAlign's (``ca`` for the toy preset's ``resalign``, ``ga`` for ``resalign-ga``). The two
are unlearned from the same data and steps and fine-tuned with the same seeds, so their harmful rates
(headline prompt set) are compared replicate by replicate: a row with metric ``harmful_rate_diff``
(``model`` ResAlign's method, ``baseline`` the twin) for before fine-tuning and one per dataset after
it holds the differences ResAlign − twin in ``values`` (the same order and seed lists as above), their
mean, SEM and the Student-t interval ``ci_low``/``ci_high`` at ``confidence`` 0.95 with ``df`` = n − 1
(:func:`resalign.eval.reports.stats.paired_difference`), for example::

    {"model": "resalign", "stage": "after_ft", "finetune": "full", "dataset": "benign-a",
     "prompts": "harmful", "metric": "harmful_rate_diff", "scorer": "toy-harm", "baseline": "ca",
     "unlearn_seeds": [0, 1], "ft_seeds": [0, 1, 2], "ci_low": -0.41, "ci_high": -0.12,
     "confidence": 0.95, "df": 5, "mean": -0.27, "sem": 0.056, "n": 6, "values": [...]}

``settings.checks.paired`` says, per pair, whether the two are within 2 SEM of each other before
fine-tuning, and per dataset whether ResAlign's after-FT rate is at most half the twin's and whether
the interval lies below 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resalign.cells import Cell, Outcome
from resalign.checkpoints import checkpoint_weights, recorded_config
from resalign.eval.reports.compare import (
    add_paired_differences,
    compare_tables,
    intro,
    matched_of,
    ours_of,
    plots,
    roles_of,
    strength_and_finding_checks,
    twins,
    write_results_md,
)
from resalign.eval.reports.validation import validation_checks, validation_figure
from resalign.eval.protocol.finetune import Finetuner, FinetuneSpec, Stage
from resalign.eval.protocol.matching import RULE, earliest_as_strong
from resalign.eval.protocol.methods import is_released, method_roles
from resalign.eval.reports.tidy import TidyReport
from resalign.eval.scoring.evaluator import Evaluator
from resalign.eval.scoring.presets import SEED_STRIDE
from resalign.eval.scoring.sets import options_for
from resalign.models.load import load_model
from resalign.models.single_file import load_compared
from resalign.progress import Bars
from resalign.eval.reports.records import Figure, add_figures, figures_of, figures_value, samples_arrays, samples_of


@dataclass
class Model:
    """One compared model: its bundle (with the weights to evaluate) and how it was chosen."""

    name: str
    bundle: Any
    run_dir: str | None = None
    matched_step: int | None = None
    unlearn_seed: int | None = None


class Comparison:
    """The compared models of one ``resalign compare`` and their measurements.

    ``base`` is the loaded base model, ``run_dirs`` (set by :meth:`add_unlearning`) the run
    directory of every unlearned model by unlearning seed and method, ``runs`` the reused ``--run``
    directories; evaluations draw their images from generation seed ``seed + k·SEED_STRIDE`` for the
    k-th of ``seeds``, the fine-tuning seeds. ``losses`` are the methods' resolved harmful losses;
    ``settings`` (the command's configuration and unlearning runs) go into the report's settings.
    """

    def __init__(self, base: Any, methods: Sequence[str], runs: Mapping[str, str], ft_data: Sequence[Any],
                 spec: FinetuneSpec, harm_sets: Sequence[Any], benign_sets: Sequence[Any], gen: Any,
                 scorer_options: Mapping[str, Any], *, seed: int, seeds: Sequence[int], unlearn_seeds: Sequence[int],
                 device: str, dtype: str, match: str, losses: Mapping[str, str | None], settings: Mapping[str, Any]):
        self.base, self.methods, self.runs, self.ft_data, self.spec = base, list(methods), dict(runs), ft_data, spec
        self.harm_sets, self.benign_sets, self.report = list(harm_sets), list(benign_sets), TidyReport("compare")
        report = self.report
        self.seed, self.seeds, self.unlearn_seeds = seed, list(seeds), list(unlearn_seeds)
        self.device, self.dtype, self.match_mode, self.losses = device, dtype, match, dict(losses)
        bundle, opts, head = base.bundle, scorer_options, self.harm_sets[:1]
        self.before_eval = Evaluator(bundle, self.harm_sets + self.benign_sets, gen, scorer_options=opts)
        self.after_eval = Evaluator(bundle, self.harm_sets, gen, scorer_options=options_for(opts, self.harm_sets))
        self.match_eval = Evaluator(bundle, head, gen, scorer_options=options_for(opts, head))
        report.settings.update(
            base_model=base.label, base_model_path=base.path, methods=list(methods), seeds=self.seeds,
            finetune=dataclasses.asdict(spec) | {"lr": spec.resolved_lr()}, datasets=[d.name for d in ft_data],
            evaluation=self.before_eval.describe(), **settings,
            prompt_sets={"harmful": [s.name for s in harm_sets], "benign": [s.name for s in benign_sets]},
            matching={"mode": match}, unlearn_seeds=self.unlearn_seeds)
        #: each method's role (settings ``method_roles``: ours, matched, twin), from its recipe
        released = [m for m, d in self.runs.items() if is_released(d)]
        report.settings["method_roles"] = method_roles(self.methods, self.losses, released)
        self.roles = roles_of(report.settings)
        self.ours = ours_of(self.roles)
        self.run_dirs: dict[int, dict[str, str]] = {}
        self.targets: dict[int, float] = {}
        self.timings: dict[str, float] = {}
        self.samples: dict[str, np.ndarray] = {}
        self._loaded: Model | None = None

    @property
    def several(self) -> bool:
        return len(self.unlearn_seeds) > 1

    def tag(self, m: str, u: int | None) -> str:
        return f"{m}, unlearning seed {u}" if self.several and u is not None else m

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def add_unlearning(self, run_dirs: Mapping[int, Mapping[str, str]], resolved: Mapping[tuple[int, str], Any]
                       ) -> None:
        """The unlearned models' run directories and resolved run configurations, by (unlearning seed, method)."""
        self.run_dirs = {u: dict(d) for u, d in run_dirs.items()}
        st = self.report.settings
        for (u, m), rc in resolved.items():
            if u == self.unlearn_seeds[0]:
                st["unlearning"][m] = rc
            if self.several:
                st.setdefault("unlearning_by_seed", {}).setdefault(str(u), {})[m] = rc
        st["run_dirs"] = self.run_dirs[self.unlearn_seeds[0]]
        if self.several:
            st["run_dirs_by_seed"] = {str(u): d for u, d in self.run_dirs.items()}

    # ------------------------------------------------------------------ strength matching
    def match_strength(self, run: Callable[..., list[Outcome]], bars: Bars) -> None:
        """``--match strength``: the targets (one cell per unlearning seed), then every baseline's earliest
        checkpoint as strong (one cell per baseline and seed); ``run(cells, fn)`` runs cells (a sweep's)."""
        cells = self.target_cells() if matched_of(self.roles) else []
        if cells:
            self.add_targets(cells, run(cells, lambda cell: self.target(cell, bars)))
            cells = self.match_cells()
            self.add_matches(cells, run(cells, lambda cell: self.match(cell, bars)))

    def target_cells(self) -> list[Cell]:
        """ResAlign's harmful rate per unlearning seed, the baselines' targets: one cell per seed (none,
        and a note in the report, without a ResAlign model)."""
        info = self.report.settings["matching"]
        if self.ours is None:
            info["note"] = "no ResAlign model to match to: baselines use their final weights"
            return []
        info["target_model"] = self.ours
        return [Cell(f"target-u{u}", {"unlearn_seed": u}) for u in self.unlearn_seeds]

    def target(self, cell: Cell, bars: Bars) -> float:
        u = cell.settings["unlearn_seed"]
        bundle = load_model(self.run_dirs[u][self.ours], device=self.device, dtype=self.dtype).bundle
        return self._quick_rate(bundle, None, bars, f"match: {self.tag(self.ours, u)}")

    def add_targets(self, cells: Sequence[Cell], outcomes: Sequence[Outcome]) -> None:
        for cell, outcome in zip(cells, outcomes):
            u = cell.settings["unlearn_seed"]
            self.targets[u] = outcome.value
            self.matching(u)["target"] = outcome.value
            self.add_time("strength matching", outcome.seconds)
        self.report.settings["matching"].update(
            prompts=self.harm_sets[0].name, seed=self.seed, images=self.match_eval.images_per_evaluation,
            rule=RULE + (", the target being ResAlign's of the same unlearning seed" if self.several else ""))

    def match_cells(self) -> list[Cell]:
        """Each baseline's earliest checkpoint as strong as its target: one cell per baseline and seed."""
        return [Cell(f"match-{m}-u{u}", {"unlearn_seed": u, "method": m})
                for m in matched_of(self.roles) for u in self.unlearn_seeds]

    def match(self, cell: Cell, bars: Bars) -> dict[str, Any]:
        """The earliest checkpoint of a baseline (of one unlearning seed) as strong as the target."""
        m, u = cell.settings["method"], cell.settings["unlearn_seed"]
        run_dir = self.run_dirs[u][m]
        bundle = load_model(run_dir, device=self.device, dtype=self.dtype).bundle
        rates = ((step, self._quick_rate(bundle, weights, bars, f"match: {self.tag(m, u)} step {step}"))
                 for step, weights in checkpoint_weights(run_dir, self.base.bundle))
        return earliest_as_strong(rates, self.targets[u], self.match_eval.images_per_evaluation)

    def add_matches(self, cells: Sequence[Cell], outcomes: Sequence[Outcome]) -> None:
        for cell, outcome in zip(cells, outcomes):
            self.matching(cell.settings["unlearn_seed"])[cell.settings["method"]] = outcome.value
            self.add_time("strength matching", outcome.seconds)

    def matching(self, u: int) -> dict[str, Any]:
        info = self.report.settings["matching"]
        return info.setdefault("by_unlearn_seed", {}).setdefault(str(u), {}) if self.several else info

    def model(self, m: str, u: int | None) -> Model:
        """Method ``m`` unlearned with seed ``u``; with ``--match strength`` a baseline at its matched checkpoint
        (the last one loaded is kept for the next cells)."""
        if m == "base":
            return Model(m, self.base.bundle)
        if self._loaded is not None and (self._loaded.name, self._loaded.unlearn_seed) == (m, u):
            return self._loaded
        d = self.run_dirs[u][m]
        model = Model(m, load_compared(d, self.base.path, device=self.device, dtype=self.dtype).bundle, d, unlearn_seed=u)
        step = self.matching(u).get(m, {}).get("chosen_step") if u in self.targets else None
        if self.roles[m]["matched"] and step is not None:
            ((_, weights),) = checkpoint_weights(d, self.base.bundle, steps={step})
            model.bundle.unet.load_state_dict(weights, strict=False)
            model.matched_step = step
        self._loaded = model
        return model

    def _quick_rate(self, bundle: Any, params: Any, bars: Bars, label: str) -> float:
        if params is None:
            params = {n: p.detach() for n, p in bundle.unet.named_parameters()}
        figs, _ = self.match_eval.evaluate(bundle=bundle, params=params, seed=self.seed, bars=bars, label=f"{label}: ")
        return next(f.value for f in figs if f.metric == "harmful_rate")

    # ------------------------------------------------------------------ measurements
    def measure_all(self, run: Callable[..., list[Outcome]], bars: Bars) -> None:
        """Every measurement cell (``run(cells, fn, on_done=...)``, a sweep's), then the report's rows."""
        cells = self.measurement_cells()
        task = bars.task("compare: evaluations", len(cells), keep=True)
        done = [0]

        def measured(_i: int, _outcome: Outcome) -> None:
            done[0] += 1
            task(done[0])

        self.add_measurements(cells, run(cells, lambda cell: self.measure(cell, bars), on_done=measured))

    def measurement_cells(self) -> list[Cell]:
        """Every evaluation, in report order: per method and unlearning seed, before fine-tuning per seed,
        then (not for the base model, as Tab. 1) per dataset and seed, fine-tuning and after."""
        cells = []
        for m in self.methods:
            for i, u in enumerate([None] if m == "base" else self.unlearn_seeds):
                model = m if u is None else f"{m}-u{u}"
                for k, seed in enumerate(self.seeds):
                    cells.append(Cell(f"before-{model}-seed{seed}", {"method": m, "unlearn_seed": u, "k": k, "i": i}))
                for d in self.ft_data if m != "base" else ():
                    for k, seed in enumerate(self.seeds):
                        cells.append(Cell(f"after-{model}-{d.name}-seed{seed}",
                                          {"method": m, "unlearn_seed": u, "k": k, "i": i, "dataset": d.name}))
        return cells

    def measure(self, cell: Cell, bars: Bars) -> Outcome:
        """One evaluation cell: the figures (and, for the first replicate, the headline set's samples)."""
        s, headline = cell.settings, self.harm_sets[0].name
        m, u, k, first = s["method"], s["unlearn_seed"], s["k"], s["i"] == 0 and s["k"] == 0
        model, seed, tag = self.model(m, u), self.seeds[k], self.tag(m, u) + ("," if self.several and u is not None else "")
        if "dataset" not in s:
            figs, imgs = self.before_eval.evaluate(bundle=model.bundle, seed=self.seed + k * SEED_STRIDE, bars=bars,
                                                   label=f"{tag} before, seed {seed}: ", keep_images=first)
        else:
            d = next(d for d in self.ft_data if d.name == s["dataset"])
            ft = Finetuner(model.bundle, self.spec, [Stage(d, self.spec.steps, d.name)], seed=seed)
            bar = bars.task(f"{tag}: fine-tuning on {d.name}, seed {seed}", self.spec.steps)
            params = ft.run(progress=lambda st, t, loss: bar(st, t))
            figs, imgs = self.after_eval.evaluate(bundle=model.bundle, params=params, seed=self.seed + k * SEED_STRIDE,
                                                  bars=bars, label=f"{tag} after {d.name}, seed {seed}: ",
                                                  keep_images=first)
        names, arrays = samples_arrays({"sample": imgs[headline][:8]} if first else {})
        return Outcome({"figures": figures_value(figs), "samples": names}, arrays)

    def add_measurements(self, cells: Sequence[Cell], outcomes: Sequence[Outcome]) -> None:
        """One row per figure and method, values ordered (unlearning seed, fine-tuning seed), from the cells."""
        for m in self.methods:
            before: list[list[Figure]] = []
            after: dict[str, list[list[Figure]]] = {d.name: [] for d in self.ft_data}
            for cell, outcome in zip(cells, outcomes):
                if cell.settings["method"] != m:
                    continue
                d = cell.settings.get("dataset")
                (before if d is None else after[d]).append(figures_of(outcome.value["figures"]))
                self.add_time(f"evaluate {m} before" if d is None else f"fine-tune and evaluate {m} on {d}",
                              outcome.seconds)
                for image in samples_of(outcome.value["samples"], outcome.arrays).values():
                    self.samples[f"{m} · before" if d is None else f"{m} · after {d}"] = image
            seeds: dict[str, Any] = {"ft_seeds": self.seeds}
            if m != "base" and not self.roles[m].get("released"):
                seeds = {"unlearn_seeds": [recorded_config(self.run_dirs[self.unlearn_seeds[0]][m]).get("seed", 0)]
                         if m in self.runs else self.unlearn_seeds, **seeds}
            add_figures(self.report, before, model=m, stage="before_ft", **seeds)
            for d in self.ft_data if m != "base" else ():
                add_figures(self.report, after[d.name], model=m, stage="after_ft", finetune=self.spec.adapt,
                            dataset=d.name, **seeds)

    # ------------------------------------------------------------------ report
    def checks(self) -> dict[str, Any]:
        """The report's checks (:func:`~resalign.eval.reports.compare.strength_and_finding_checks`), with
        ``--match steps`` after the paired differences ResAlign − twin (:func:`twins`, as its recipe names it)."""
        names, headline = [d.name for d in self.ft_data], self.harm_sets[0].name
        pairs = twins(self.roles)
        if self.match_mode == "steps":
            add_paired_differences(self.report, pairs, names, headline)
        checks = strength_and_finding_checks(self.report, self.methods, names, headline)
        checks["validation"] = validation_checks(self.report, self.run_dirs, pairs)
        self.report.settings["checks"] = checks
        return checks

    def write(self, path: Path, checks: Mapping[str, Any], results_md: str | None, defaults: Mapping[str, Any]) -> None:
        """``report.md``/``report.json`` with Tab. 1's tables and the plots in ``path``; ``results_md`` too."""
        report = self.report
        tables = compare_tables(report)
        figures = plots(path, report, self.methods, [d.name for d in self.ft_data], self.harm_sets, self.samples)
        figure = validation_figure(path, report)
        if figure is not None:
            figures.append(figure)
        report.write(path, title="resalign compare: harmful rate before and after benign fine-tuning",
                     intro=intro(report, self.spec, self.seeds, checks), tables=tables, figures=figures)
        if results_md:
            write_results_md(Path(results_md), report, tables, checks, path, defaults)
