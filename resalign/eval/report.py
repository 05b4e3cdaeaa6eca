"""The tidy ``report.json`` every command writes (DESIGN.md): one row per measured figure.

A row carries what identifies the figure (model, stage, finetune, dataset, prompts, metric, step, ...)
and its statistics over seeds (mean, sem, n, values). Fields that do not apply are left out, so pandas
reads every command's report the same way: ``pd.DataFrame(json.load(f)["results"])``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from resalign import __version__

#: Identifying fields of a row, in the order they are written.
KEYS = ("model", "stage", "finetune", "dataset", "prompts", "metric", "step", "scorer", "solver", "setting")
STATS = ("mean", "sem", "n", "values")


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / √n; 0 for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(values) / n
    if n == 1:
        return m, 0.0
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


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

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "version": __version__, "settings": self.settings, "results": self.results}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TidyReport:
        return cls(data["command"], dict(data.get("settings", {})), list(data.get("results", [])))

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
