"""The tables of ``resalign ablate``: fidelity and cost per solver setting, the sampled configurations,
cosine by subset of configurations, and the effect runs' harmful rates."""

from __future__ import annotations

from typing import Any

from resalign.eval.ablation.measure import SOLVER_METRICS
from resalign.eval.reports.tidy import MarkdownTable, TidyReport, fmt_mean_sem


def solver_table(report: TidyReport, optimizer: str = "all", adapter: str = "all") -> MarkdownTable:
    which = _subset_name(optimizer, adapter)
    table = MarkdownTable(f"Hypergradient fidelity and cost, {which} (mean ± SEM over seeds × configurations)",
                          ["setting", "cosine", "relative error", "seconds", "peak MB"])
    where = {"stage": "fidelity", "optimizer": optimizer, "adapter": adapter}
    labels = list(dict.fromkeys(r["setting"] for r in report.rows(**where)))
    for label in labels:
        cells = [label]
        for metric in SOLVER_METRICS:
            r = report.get(**where, metric=metric, setting=label)
            cells.append(fmt_mean_sem(r["mean"], r["sem"], r["n"]) if r else "—")
        table.rows.append(cells)
    return table


def problems_table(problems: list[dict[str, Any]]) -> MarkdownTable:
    """One row per simulated fine-tuning: ‖g‖, ‖exact‖, λ_max and, for full-parameter SGD, lr·λ_max."""
    table = MarkdownTable("Sampled configurations (‖g‖ = first-order, ‖exact‖ = unrolled, λ_max of ∇²L_FT at θ_FT "
                          "by power iteration; full-parameter SGD with lr·λ_max ≥ 2 no longer contracts its top "
                          "direction)",
                          ["seed", "configuration", "‖g‖", "‖exact‖", "λ_max", "lr·λ_max"])
    for p in problems:
        lam, lr_lam = p.get("lambda_max"), p.get("lr_lambda_max")
        table.rows.append([str(p["seed"]), p["config"], f"{p['g_norm']:.3g}", f"{p['exact_norm']:.3g}",
                           f"{lam:.3g}" if lam is not None else "—", f"{lr_lam:.2f}" if lr_lam is not None else "—"])
    return table


def _subset_name(optimizer: str, adapter: str) -> str:
    if optimizer == adapter == "all":
        return "all sampled configurations"
    return "configurations " + " and ".join(
        part for part in (f"with ADAPT {adapter}" if adapter != "all" else "",
                          f"with optimizer {optimizer}" if optimizer != "all" else "") if part)


def fidelity_subsets(report: TidyReport) -> list[tuple[str, str]]:
    """(optimizer, adapter) subsets with fidelity rows: all, then every cell, then per optimizer / adapter."""
    found = list(dict.fromkeys((r["optimizer"], r["adapter"]) for r in report.rows(stage="fidelity", metric="cosine")))
    rank = lambda key: (key != ("all", "all"), "all" in key, key[1], key[0])  # noqa: E731
    return sorted(found, key=rank)


def cosine_by_subset_table(report: TidyReport) -> MarkdownTable:
    """Cosine to the exact hypergradient of every setting (rows) in every subset of configurations (columns)."""
    subsets = fidelity_subsets(report)
    head = ["all" if s == ("all", "all") else "/".join(p for p in (s[1], s[0]) if p != "all") for s in subsets]
    table = MarkdownTable("Cosine to the exact hypergradient by ADAPT method / optimizer of the configuration "
                          "(mean ± SEM, n configurations)", ["setting", *head])
    labels = list(dict.fromkeys(r["setting"] for r in report.rows(stage="fidelity", metric="cosine")))
    for label in labels:
        cells = [label]
        for optimizer, adapter in subsets:
            r = report.get(stage="fidelity", metric="cosine", setting=label, optimizer=optimizer, adapter=adapter)
            cells.append(fmt_mean_sem(r["mean"], r["sem"], r["n"]) if r else "—")
        table.rows.append(cells)
    return table


def effect_table(report: TidyReport, key: str) -> MarkdownTable:
    table = MarkdownTable("Effect: harmful rate before and after benign full fine-tuning (mean ± SEM over fine-tuning seeds)",
                          [key, "prompts", "before FT", "after FT", "benign accuracy after FT", "unlearning s"])
    names = list(dict.fromkeys(r[key] for r in report.results if key in r and r.get("stage") in ("before_ft", "after_ft")))
    for name in names:
        for prompts in ("harmful", "implicit"):
            before = report.rows(**{key: name}, metric="harmful_rate", stage="before_ft", prompts=prompts)
            after = report.rows(**{key: name}, metric="harmful_rate", stage="after_ft", prompts=prompts)
            acc = report.rows(**{key: name}, metric="prompt_accuracy", stage="after_ft")
            secs = report.rows(**{key: name}, metric="train_seconds")
            if not before and not after:
                continue
            fmt = lambda rows: fmt_mean_sem(rows[0]["mean"], rows[0]["sem"], rows[0]["n"]) if rows else "—"  # noqa: E731
            table.rows.append([name, prompts, fmt(before), fmt(after), fmt(acc),
                               f"{secs[0]['mean']:.0f}" if secs else "—"])
    return table


def solver_tables(report: TidyReport, problems: list[dict[str, Any]], effect: bool) -> list[MarkdownTable]:
    """``ablate solvers``' tables: cosine by subset, fidelity and cost, the sampled configurations and,
    with ``effect``, the effect runs'."""
    tables = [cosine_by_subset_table(report), solver_table(report), problems_table(problems)]
    return tables + ([effect_table(report, "solver")] if effect else [])
