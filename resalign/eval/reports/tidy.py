"""The tidy ``report.json`` every command writes (DESIGN.md): one row per measured figure.

A row carries what identifies the figure (model, stage, finetune, dataset, prompts, metric, step, ...)
and its statistics over seeds (mean, sem, n, values). Fields that do not apply are left out, so pandas
reads every command's report the same way: ``pd.DataFrame(json.load(f)["results"])``.

Next to it a command writes ``report.csv`` (the same rows, flat) and ``report.md``: the tables a
person reads (mean ± SEM over seeds, as the paper's Tab. 1 and Fig. 2 report them, Sec. 4.1), the
exact settings, the package versions and the seeds that produced them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resalign import __version__
from resalign.eval.reports.stats import mean_sem

#: Identifying fields of a row, in the order they are written.
KEYS = ("model", "stage", "finetune", "dataset", "prompts", "metric", "step", "scorer", "solver", "setting")
STATS = ("mean", "sem", "n", "values")

#: Packages whose versions every report records (those importable in this environment).
VERSIONED_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "numpy",
    "scipy",
    "onnxruntime",
    "nudenet",
    "matplotlib",
)

__all__ = ["KEYS", "STATS", "MarkdownTable", "TidyReport", "environment", "fmt_mean_sem", "mean_sem"]


def environment() -> dict[str, str]:
    """Versions of Python, resalign and the numeric packages, for the report's settings."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "resalign": __version__, "platform": platform.platform()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def fmt_mean_sem(mean: float | None, sem: float | None, n: int | None = None, digits: int = 3) -> str:
    """``0.123 ± 0.010`` (``± `` left out for a single value; ``—`` for a missing figure)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if n == 1 or sem is None or (isinstance(sem, float) and math.isnan(sem)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


@dataclass
class MarkdownTable:
    """A table for ``report.md``: a title, column headers and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def render(self) -> str:
        lines = [f"### {self.title}", ""] if self.title else []
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"


@dataclass
class TidyReport:
    command: str
    settings: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)

    def add(self, values: float | Iterable[float], **keys: Any) -> dict[str, Any]:
        """Add one figure; ``values`` are its per-seed measurements (a single float is n = 1)."""
        vals = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
        m, s = mean_sem(vals)
        row = {k: keys.pop(k) for k in KEYS if keys.get(k) is not None}
        row.update({k: v for k, v in keys.items() if v is not None})
        row.update(mean=m, sem=s, n=len(vals), values=vals)
        self.results.append(row)
        return row

    def rows(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.results if all(r.get(k) == v for k, v in match.items())]

    def get(self, **match: Any) -> dict[str, Any] | None:
        """The one row matching ``match`` (None when there is none; an error when several match)."""
        found = self.rows(**match)
        if len(found) > 1:
            raise ValueError(f"{len(found)} report rows match {match}")
        return found[0] if found else None

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "version": __version__, "settings": self.settings, "results": self.results}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TidyReport:
        return cls(data["command"], dict(data.get("settings", {})), list(data.get("results", [])))

    @classmethod
    def read(cls, path: str | Path) -> TidyReport:
        """Read a ``report.json`` (or the one inside run directory ``path``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_csv(self) -> str:
        cols: list[str] = [k for k in KEYS if any(k in r for r in self.results)]
        extra = sorted({k for r in self.results for k in r} - set(cols) - set(STATS))
        cols += extra + ["mean", "sem", "n", "values"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in self.results:
            w.writerow({**r, "values": " ".join(f"{v:.6g}" for v in r.get("values", []))})
        return buf.getvalue()

    # ------------------------------------------------------------------ human-readable tables
    def pivot(
        self,
        row_key: str | Callable[[dict[str, Any]], str],
        col_key: str | Callable[[dict[str, Any]], str],
        *,
        rows_order: Sequence[str] | None = None,
        cols_order: Sequence[str] | None = None,
        title: str = "",
        corner: str = "",
        digits: int = 3,
        where: Mapping[str, Any] | None = None,
    ) -> MarkdownTable:
        """A table with one line per ``row_key`` value and one column per ``col_key`` value, cells mean ± SEM.

        Keys are row fields or functions of a row; ``where`` keeps only matching rows.
        """
        rk = row_key if callable(row_key) else (lambda r, k=row_key: str(r.get(k, "")))
        ck = col_key if callable(col_key) else (lambda r, k=col_key: str(r.get(k, "")))
        selected = self.rows(**dict(where or {}))
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        for r in selected:
            cells[(rk(r), ck(r))] = r
        row_names = list(rows_order) if rows_order else _unique(rk(r) for r in selected)
        col_names = list(cols_order) if cols_order else _unique(ck(r) for r in selected)
        table = MarkdownTable(title, [corner] + col_names)
        for name in row_names:
            line = [name]
            for col in col_names:
                r = cells.get((name, col))
                line.append(fmt_mean_sem(r["mean"], r["sem"], r["n"], digits) if r else "—")
            table.rows.append(line)
        return table

    def results_table(self, title: str = "All figures", digits: int = 4) -> MarkdownTable:
        """Every row, one line each, with its identifying fields."""
        cols = [k for k in KEYS if any(k in r for r in self.results)]
        table = MarkdownTable(title, cols + ["mean ± SEM", "n"])
        for r in self.results:
            table.rows.append([str(r.get(k, "")) for k in cols] + [fmt_mean_sem(r["mean"], r["sem"], r["n"], digits), str(r["n"])])
        return table

    def to_markdown(
        self,
        *,
        title: str | None = None,
        intro: str = "",
        tables: Sequence[MarkdownTable] = (),
        figures: Sequence[tuple[str, str]] = (),
        full_table: bool = True,
    ) -> str:
        """``report.md``: the given tables, figures (caption, file), every row, settings and versions."""
        parts = [f"# {title or f'resalign {self.command}'}", ""]
        stamp = self.settings.get("finished") or _dt.datetime.now().isoformat(timespec="seconds")
        parts.append(f"`resalign {self.command}`, resalign {__version__}, {stamp}.")
        parts.append("")
        if intro:
            parts += [intro.strip(), ""]
        for t in tables:
            parts.append(t.render())
        for caption, file in figures:
            parts += [f"![{caption}]({file})", "", f"*{caption}*", ""]
        if full_table and self.results:
            parts.append(self.results_table().render())
        seeds = self.settings.get("seeds")
        if seeds is not None:
            parts += [f"Seeds: {', '.join(str(s) for s in seeds)}.", ""]
        parts += ["### Settings", "", "```json", json.dumps(_jsonable(self.settings), indent=2, sort_keys=True), "```", ""]
        return "\n".join(parts)

    def write(
        self,
        out_dir: str | Path,
        *,
        title: str | None = None,
        intro: str = "",
        tables: Sequence[MarkdownTable] = (),
        figures: Sequence[tuple[str, str]] = (),
        full_table: bool = True,
    ) -> dict[str, Path]:
        """Write ``report.json``, ``report.csv`` and ``report.md`` into ``out_dir`` (atomically)."""
        from resalign.rundir import atomic_write_json, atomic_write_text

        out_dir = Path(out_dir)
        self.settings.setdefault("versions", environment())
        self.settings.setdefault("finished", _dt.datetime.now().isoformat(timespec="seconds"))
        paths = {
            "json": atomic_write_json(out_dir / "report.json", _jsonable(self.to_dict())),
            "csv": atomic_write_text(out_dir / "report.csv", self.to_csv()),
            "md": atomic_write_text(
                out_dir / "report.md",
                self.to_markdown(title=title, intro=intro, tables=tables, figures=figures, full_table=full_table),
            ),
        }
        return paths


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for i in items:
        seen.setdefault(i, None)
    return list(seen)


def _jsonable(obj: Any) -> Any:
    """Settings and rows as strict JSON: NaN and infinities become null, paths strings."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return obj
