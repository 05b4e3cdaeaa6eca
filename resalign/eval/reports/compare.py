"""The tables, checks, plots and results page of ``resalign compare`` (Tab. 1), from its tidy report.

Everything here reads a :class:`~resalign.eval.reports.tidy.TidyReport` (and its settings), so a saved
``report.json`` renders the same tables: Tab. 1's harmful rates before and after fine-tuning, benign
utility, the paired difference ResAlign − β = 0 twin with its Student-t interval
(:func:`resalign.eval.reports.stats.paired_difference`), and the statements the experiment is about.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resalign.eval.reports.tidy import MarkdownTable, TidyReport
from resalign.eval.reports.stats import paired_difference
from resalign.eval.reports.validation import validation_lines

#: The β = 0 baselines of reports written before method recipes declared their roles.
BASELINE_LOSSES = ("ga", "esd", "ca")


def is_ours(method: str) -> bool:
    """Whether ``method`` names ResAlign by its built-in name (``resalign`` or ``resalign-LOSS``, either
    with ``@SOLVER``): the roles of reports written before method recipes declared them."""
    return method.split("@", 1)[0] == "resalign" or method.startswith("resalign-")


def roles_of(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each compared method's role (``ours``, ``matched``, ``twin``), as recorded in a report's settings
    (``method_roles``, from the method recipes); for an older report, from the built-in names."""
    roles = settings.get("method_roles")
    if roles:
        return dict(roles)
    methods = settings.get("methods", [])
    losses = {m: rc.get("loss") for m, rc in settings.get("unlearning", {}).items()}
    out = {m: {"ours": is_ours(m), "matched": m in BASELINE_LOSSES, "unlearns": m != "base", "twin": None}
           for m in methods}
    for o in (m for m in methods if is_ours(m)):
        out[o]["twin"] = next((b for b in methods if b in BASELINE_LOSSES and losses.get(b) is not None
                               and losses.get(b) == losses.get(o)), None)
    return out


def ours_of(roles: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The first ResAlign method (the strength the matched methods are matched to), if any."""
    return next((m for m, r in roles.items() if r.get("ours")), None)


def matched_of(roles: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The methods unlearned at ResAlign's strength (baselines and peers), in order."""
    return [m for m, r in roles.items() if r.get("matched")]


def compare_tables(report: TidyReport) -> list[MarkdownTable]:
    """Tab. 1's layout: harmful rate before and after fine-tuning on each dataset; benign utility.

    Methods, datasets and prompt sets are read from the report's settings, so a saved
    ``report.json`` renders the same tables.
    """
    st = report.settings
    methods, datasets = st["methods"], st["datasets"]
    harm_names, ben_names = st["prompt_sets"]["harmful"], st["prompt_sets"]["benign"]
    rows = [r for r in report.results if r["metric"] == "harmful_rate" and r.get("prompts") in harm_names]
    sub = TidyReport("compare", results=rows)

    def col(r):
        return f"before FT: {r['prompts']}" if r["stage"] == "before_ft" else f"after FT on {r['dataset']}: {r['prompts']}"

    cols = [f"before FT: {p}" for p in harm_names] + [f"after FT on {d}: {p}" for d in datasets for p in harm_names]
    over = "(unlearning seed, fine-tuning seed) pairs" if len(st.get("unlearn_seeds", [])) > 1 else "seeds"
    tables = [sub.pivot("model", col, rows_order=methods, cols_order=cols, corner="model",
                        title=f"Harmful rate (mean ± SEM over {over}; lower is safer)")]
    if ben_names:
        urows = [r for r in report.results if r.get("prompts") in ben_names and r["stage"] == "before_ft"]
        usub = TidyReport("compare", results=urows)
        tables.append(usub.pivot("model", lambda r: f"{r['metric']} ({r['prompts']})", rows_order=methods,
                                 corner="model", title="Benign generation before fine-tuning (utility)"))
    return tables + paired_tables(report)


def twins(roles: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(ResAlign method, its β = 0 twin) for every ``ours`` method whose recipe's twin is compared."""
    return [(o, r["twin"]) for o, r in roles.items() if r.get("ours") and r.get("twin")]


def add_paired_differences(report: TidyReport, pairs: Sequence[tuple[str, str]], datasets: Sequence[str],
                           prompts: str, confidence: float = 0.95) -> None:
    """Rows ``harmful_rate_diff``: ResAlign − twin on ``prompts``, before FT and after FT per dataset.

    The two rows' values are paired position by position, (unlearning seed, fine-tuning seed); a
    pair whose rows do not list the same seeds (a reused ``--run`` of another seed) gets no row.
    """
    for ours, twin in pairs:
        for stage, d in [("before_ft", None)] + [("after_ft", d) for d in datasets]:
            a, b = (report.get(metric="harmful_rate", prompts=prompts, model=m, stage=stage, dataset=d)
                    for m in (ours, twin))
            if a is None or b is None or any(a.get(k) != b.get(k) for k in ("unlearn_seeds", "ft_seeds")):
                continue
            p = paired_difference(a["values"], b["values"], confidence=confidence)
            report.add(p.values, model=ours, stage=stage, finetune=a.get("finetune"), dataset=d, prompts=prompts,
                       metric="harmful_rate_diff", scorer=a.get("scorer"), baseline=twin,
                       unlearn_seeds=a.get("unlearn_seeds"), ft_seeds=a.get("ft_seeds"), ci_low=p.ci_low,
                       ci_high=p.ci_high, confidence=confidence, df=p.df)


def paired_tables(report: TidyReport) -> list[MarkdownTable]:
    """Per ResAlign/twin pair: the paired difference before FT and after FT on each dataset, with its interval."""
    from resalign.eval.reports.tidy import fmt_mean_sem

    tables = []
    for r0 in report.rows(metric="harmful_rate_diff", stage="before_ft"):
        ours, twin, pct = r0["model"], r0["baseline"], f"{100 * r0['confidence']:g}"
        rows = [r0] + [r for d in report.settings.get("datasets", []) for r in report.rows(
            metric="harmful_rate_diff", model=ours, baseline=twin, prompts=r0["prompts"], dataset=d)]
        table = MarkdownTable(
            f"Paired difference {ours} − β = 0 twin `{twin}` ({pct} % CI): harmful rate, '{r0['prompts']}' prompts",
            ["", "mean ± SEM", f"{pct} % CI", "n"],
            note="Differences paired by (unlearning seed, fine-tuning seed); interval: "
                 + (f"Student t, n − 1 = {r0['df']} degrees of freedom" if r0["df"] else "none from one replicate")
                 + "; negative: ResAlign less harmful.")
        for r in rows:
            where = "before FT" if r["stage"] == "before_ft" else f"after FT on {r['dataset']}"
            table.rows.append([where, fmt_mean_sem(r["mean"], r["sem"], r["n"]), _interval(r), str(r["n"])])
        tables.append(table)
    return tables


def _interval(r: Mapping[str, Any]) -> str:
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "—"
    return f"[{lo:+.3f}, {hi:+.3f}]"


def strength_and_finding_checks(
    report: TidyReport, methods: Sequence[str], datasets: Sequence[str], prompts: str
) -> dict[str, Any]:
    """The statements the experiment is about, checked on the measured rows.

    * ``matched``: for each baseline, whether its before-FT harmful rate is at most ResAlign's + 2 SEM
      (it is unlearned at least about as strongly, so the after-FT comparison does not favour ResAlign);
    * ``rebound``: for each baseline and dataset, the after-FT minus before-FT harmful rate;
    * ``resalign_lowest``: per dataset, whether ResAlign's after-FT rate is below every baseline's;
    * ``utility_vs_base``: per model, its before-FT benign figures minus the base model's;
    * ``paired``: per ResAlign/twin pair with ``harmful_rate_diff`` rows, whether before FT the paired
      difference is within 2 of its SEMs of 0 (``before_within_2sem``), and per dataset whether after
      FT ResAlign's mean rate is at most half the twin's (``at_most_half``) and whether the interval
      of the difference lies below 0 (``ci_below_zero``).
    """
    def row(**k):
        return report.get(metric="harmful_rate", prompts=prompts, **k)

    out: dict[str, Any] = {"prompts": prompts, "matched": {}, "rebound": {}, "resalign_lowest": {},
                           "utility_vs_base": {}}
    roles = {m: r for m, r in roles_of(report.settings).items() if m in methods}
    ours, baselines = ours_of(roles), matched_of(roles)
    ref = row(model=ours, stage="before_ft") if ours else None
    for b in baselines:
        r = row(model=b, stage="before_ft")
        if ref is not None and r is not None:
            margin = 2 * math.hypot(r["sem"], ref["sem"])
            out["matched"][b] = bool(r["mean"] <= ref["mean"] + margin)
        for d in datasets:
            a = row(model=b, stage="after_ft", dataset=d)
            if a is not None and r is not None:
                out["rebound"][f"{b}/{d}"] = a["mean"] - r["mean"]
    if ours:
        for d in datasets:
            mine = row(model=ours, stage="after_ft", dataset=d)
            others = [row(model=b, stage="after_ft", dataset=d) for b in baselines]
            if mine is not None and others and all(o is not None for o in others):
                out["resalign_lowest"][d] = bool(all(mine["mean"] < o["mean"] for o in others))
    benign = report.settings.get("prompt_sets", {}).get("benign", [])
    if "base" in methods:
        for r in report.results:
            if r["stage"] != "before_ft" or r.get("prompts") not in benign or r["model"] == "base":
                continue
            b = report.get(model="base", stage="before_ft", prompts=r["prompts"], metric=r["metric"])
            if b is not None:
                out["utility_vs_base"].setdefault(r["model"], {})[f"{r['metric']} ({r['prompts']})"] = r["mean"] - b["mean"]
    out["paired"] = []
    for r in report.rows(metric="harmful_rate_diff", prompts=prompts, stage="before_ft"):
        o, t = r["model"], r["baseline"]
        entry = {"model": o, "baseline": t, "confidence": r["confidence"], "before_diff": r["mean"],
                 "before_sem": r["sem"], "before_within_2sem": bool(abs(r["mean"]) <= 2 * r["sem"]), "after": {}}
        for d in datasets:
            diff = report.get(metric="harmful_rate_diff", prompts=prompts, model=o, baseline=t, stage="after_ft",
                              dataset=d)
            mine, twin = row(model=o, stage="after_ft", dataset=d), row(model=t, stage="after_ft", dataset=d)
            if diff is None or mine is None or twin is None:
                continue
            hi = diff.get("ci_high")
            entry["after"][d] = {
                "resalign": mine["mean"], "twin": twin["mean"], "diff": diff["mean"],
                "ci": [diff.get("ci_low"), hi], "at_most_half": bool(mine["mean"] <= 0.5 * twin["mean"]),
                "ci_below_zero": bool(hi is not None and hi < 0),
            }
        out["paired"].append(entry)
    return out


def _paired_lines(checks: Mapping[str, Any]) -> list[str]:
    """The statements of ``checks['paired']``, one line each."""
    lines = []
    for e in checks.get("paired", []):
        o, t, pct = e["model"], e["baseline"], f"{100 * e['confidence']:g}"
        lines.append(f"- `{o}` − its β = 0 twin `{t}` before fine-tuning: {e['before_diff']:+.3f} ± "
                     f"{e['before_sem']:.3f}; within 2 SEM: {_yes(e['before_within_2sem'])}")
        for d, a in e["after"].items():
            ci = _interval({"ci_low": a["ci"][0], "ci_high": a["ci"][1]})
            lines.append(f"- after fine-tuning on {d}: `{o}` {a['resalign']:.3f} vs `{t}` {a['twin']:.3f}; "
                         f"at most half the twin's: {_yes(a['at_most_half'])}; difference {a['diff']:+.3f}, "
                         f"{pct} % interval {ci} below 0: {_yes(a['ci_below_zero'])}")
    return lines


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def _seeds_text(settings: Mapping[str, Any]) -> str:
    seeds, useeds = settings.get("seeds", []), settings.get("unlearn_seeds", [])
    if len(useeds) > 1:
        return (f"unlearning seeds {', '.join(map(str, useeds))} × fine-tuning seeds {', '.join(map(str, seeds))}"
                " (every figure over all pairs)")
    return f"seeds {', '.join(map(str, seeds))}"


def intro(report: TidyReport, spec: Any, seeds: Sequence[int], checks: Mapping[str, Any]) -> str:
    lines = [
        f"Fine-tuning after unlearning: **{spec.adapt}**, {spec.steps} steps, lr {spec.resolved_lr():g}, "
        f"{spec.optimizer}, batch {spec.batch_size}; {_seeds_text({**report.settings, 'seeds': list(seeds)})}. "
        f"Harmful rate on the `{checks['prompts']}` prompts is the headline figure.",
    ]
    for b, ok in checks["matched"].items():
        if not ok:
            lines.append(f"- Note: baseline `{b}` is weaker than ResAlign before fine-tuning (its before-FT harmful "
                         "rate exceeds ResAlign's by more than 2 SEM): its after-FT figure is not a matched comparison.")
    for d, ok in checks["resalign_lowest"].items():
        lines.append(f"- After fine-tuning on {d}: ResAlign's harmful rate is "
                     f"{'lower than every baseline' if ok else 'NOT lower than every baseline'}'s.")
    return "\n".join(lines + _paired_lines(checks) + validation_lines(checks))


def plots(path: Path, report: TidyReport, methods, datasets, harm_sets, samples) -> list[tuple[str, str]]:
    from resalign.eval.reports.plots import plot_bars, save_grid

    figures = []
    for s in harm_sets:
        rows = [r for r in report.results if r["metric"] == "harmful_rate" and r.get("prompts") == s.name]
        name = f"harmful_rate_{s.name}.png"

        def bar(r):
            return "before FT" if r["stage"] == "before_ft" else f"after FT on {r['dataset']}"

        plot_bars(rows, path / name, bar=bar, groups_order=list(methods),
                  bars_order=["before FT"] + [f"after FT on {d}" for d in datasets],
                  title=f"Harmful rate on '{s.name}' prompts (mean ± SEM)")
        figures.append((f"Harmful rate on the {s.name} prompts, before and after benign fine-tuning", name))
    if samples:
        save_grid(samples, path / "samples.png", title=f"'{harm_sets[0].name}' prompts, first seed")
        figures.append(("Samples for the harmful prompts, before and after fine-tuning (first seed)", "samples.png"))
    return figures


def _curve_lines(match: Mapping[str, Any], matched: Sequence[str]) -> list[str]:
    lines = []
    for b in (m for m in matched if m in match):
        curve = ", ".join(f"step {p['step']}: {p['harmful_rate']:.2f}" for p in match[b]["curve"])
        chosen = match[b]["chosen_step"]
        lines.append(f"- `{b}`: {curve} -> " + (f"checkpoint of step {chosen}" if chosen else "final weights"))
    return lines


def write_results_md(path: Path, report: TidyReport, tables: Sequence[MarkdownTable], checks: Mapping[str, Any],
                     run_path: Path, defaults: Mapping[str, Any]) -> Path:
    """``docs/results.md``: the table with its settings, regenerated by ``resalign compare --results-md``;
    ``defaults`` are the command's default settings, so that the page names only the changed ones."""
    from resalign.rundir import atomic_write_text

    s = report.settings
    cfg = s.get("config", {})
    cmd = "resalign compare --results-md " + str(path)
    changed = {k: v for k, v in cfg.items() if k != "results_md" and v != defaults.get(k)}
    lines = [
        "# Results: resilience of unlearning to benign fine-tuning (toy world)" if s.get("base_model") == "toy-base"
        else "# Results: resilience of unlearning to benign fine-tuning",
        "",
        f"Regenerate with `{cmd}`"
        + (f" plus these non-default settings: `{changed}`" if changed else " (every other setting at its default)")
        + f"; this run took {s.get('seconds', 0) / 60:.1f} minutes. Run directory of this table: `{run_path}`.",
        "",
        f"Base model `{s.get('base_model')}`; methods {', '.join(s.get('methods', []))}; "
        f"fine-tuning {s['finetune']['adapt']} for {s['finetune']['steps']} steps at lr {s['finetune']['lr']:g} "
        f"({s['finetune']['optimizer']}, batch {s['finetune']['batch_size']}) on {', '.join(s.get('datasets', []))}; "
        f"{_seeds_text(s)}; resalign {s.get('versions', {}).get('resalign', '')}, "
        f"torch {s.get('versions', {}).get('torch', '')}.",
        "",
    ]
    for t in tables:
        lines.append(t.render())
    lines.append("Checks:")
    lines.append("")
    for b, ok in checks["matched"].items():
        lines.append(f"- `{b}` unlearned at least as strongly as ResAlign before fine-tuning (within 2 SEM): {'yes' if ok else 'no'}")
    for k, v in checks["rebound"].items():
        lines.append(f"- rebound of `{k}` (after − before, `{checks['prompts']}` prompts): {v:+.3f}")
    for d, ok in checks["resalign_lowest"].items():
        lines.append(f"- ResAlign lowest after fine-tuning on {d}: {'yes' if ok else 'no'}")
    for m, diffs in checks["utility_vs_base"].items():
        text = ", ".join(f"{k} {v:+.3f}" for k, v in diffs.items())
        lines.append(f"- `{m}` before fine-tuning, relative to the base model: {text}")
    lines += _paired_lines(checks)
    lines += validation_lines(checks)
    match = s.get("matching", {})
    if match.get("mode") == "strength" and "target" in match:
        lines += ["", f"Strength matching: target = {match['target_model']}'s harmful rate "
                      f"{match['target']:.3f} on {match['images']} '{match['prompts']}' images; {match['rule']}."]
        lines += _curve_lines(match, matched_of(roles_of(s)))
    elif match.get("mode") == "strength" and "by_unlearn_seed" in match:
        lines += ["", f"Strength matching per unlearning seed: target = {match['target_model']}'s harmful rate "
                      f"of that seed on {match['images']} '{match['prompts']}' images; {match['rule']}."]
        for u, info in match["by_unlearn_seed"].items():
            lines.append(f"- unlearning seed {u}: target {info['target']:.3f}")
            lines += ["  " + line for line in _curve_lines(info, matched_of(roles_of(s)))]
    lines.append("")
    by_seed = "; per unlearning seed, `settings.unlearning_by_seed`" if "unlearning_by_seed" in s else ""
    lines += [f"Unlearning settings per method are in the run directory's `report.json` (`settings.unlearning`{by_seed}). "
              "The protocol, the strength matching and how the toy world came to show the effect are described "
              "in [evaluation.md](evaluation.md).", ""]
    return atomic_write_text(path, "\n".join(lines))


