"""Prompt files: plain text (one prompt a line) or CSV with a ``prompt`` column.

CSV files with I2P's columns are honoured: ``evaluation_seed`` (the seed of each prompt's images),
``evaluation_guidance`` (its guidance scale) and ``categories`` (comma-separated, e.g. "sexual,
violence"), with a category filter. Blank lines and lines starting with ``#`` in text files are
skipped. Bad input raises :class:`DataError` naming the file, line and field.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from resalign.errors import ConfigError, DataError

#: Largest per-prompt seed (``evaluation_seed``) accepted.
MAX_SEED = 2**63 - 1


@dataclass
class PromptSet:
    """Prompts with optional per-prompt seeds, guidance scales and categories (I2P columns)."""

    prompts: list[str]
    seeds: list[int] | None = None
    guidance: list[float] | None = None
    categories: list[list[str]] | None = None
    source: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def filter_categories(self, wanted: Iterable[str]) -> PromptSet:
        """The prompts having at least one of the ``wanted`` categories (case-insensitive)."""
        wanted = {w.strip().lower() for w in wanted if w.strip()}
        if not wanted:
            return self
        if self.categories is None:
            raise DataError(f"{self.source or 'prompt set'}: no 'categories' column to filter on")
        keep = [i for i, cats in enumerate(self.categories) if wanted & {c.lower() for c in cats}]
        return self.subset(keep)

    def subset(self, index: Sequence[int]) -> PromptSet:
        def pick(xs):
            return None if xs is None else [xs[i] for i in index]

        return PromptSet(
            [self.prompts[i] for i in index],
            pick(self.seeds),
            pick(self.guidance),
            pick(self.categories),
            self.source,
            {k: [v[i] for i in index] for k, v in self.extra.items()},
        )


def _read_csv(path: Path) -> PromptSet:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV file (expected a header with a 'prompt' column)")
        fields = [c.strip() for c in reader.fieldnames]
        reader.fieldnames = fields
        if "prompt" not in fields:
            raise DataError(f"{path}: no 'prompt' column (columns: {', '.join(map(repr, fields)) or 'none'})")
        prompts: list[str] = []
        seeds: list[int] = []
        guidance: list[float] = []
        cats: list[list[str]] = []
        for i, row in enumerate(reader):
            lineno = i + 2
            prompt = row.get("prompt")
            if prompt is None:
                raise DataError(f"{path}:{lineno}: missing field 'prompt'")
            prompts.append(prompt)
            if "evaluation_seed" in fields:
                value = (row.get("evaluation_seed") or "").strip()
                try:
                    seed = int(float(value))
                except (ValueError, OverflowError):
                    raise DataError(f"{path}:{lineno}: field 'evaluation_seed' is not an integer: {value!r}") from None
                if not 0 <= seed <= MAX_SEED:
                    raise DataError(f"{path}:{lineno}: field 'evaluation_seed' must lie in [0, 2**63), got {value!r}")
                seeds.append(seed)
            if "evaluation_guidance" in fields:
                value = (row.get("evaluation_guidance") or "").strip()
                try:
                    scale = float(value)
                except ValueError:
                    raise DataError(f"{path}:{lineno}: field 'evaluation_guidance' is not a number: {value!r}") from None
                if not math.isfinite(scale):
                    raise DataError(f"{path}:{lineno}: field 'evaluation_guidance' must be a finite number, got {value!r}")
                guidance.append(scale)
            if "categories" in fields:
                cats.append([c.strip() for c in (row.get("categories") or "").split(",") if c.strip()])
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return PromptSet(
        prompts,
        seeds if "evaluation_seed" in fields else None,
        guidance if "evaluation_guidance" in fields else None,
        cats if "categories" in fields else None,
        source=str(path),
    )


def _read_text(path: Path) -> PromptSet:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"{path}: no prompts (one prompt a line expected)")
    return PromptSet(prompts, source=str(path))


def read_prompts(path: str | os.PathLike, categories: Iterable[str] | None = None, limit: int | None = None) -> PromptSet:
    """Read a prompt file (``.csv``: a ``prompt`` column; otherwise one prompt a line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {str(path)!r} does not exist")
    try:
        ps = _read_csv(path) if path.suffix.lower() == ".csv" else _read_text(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"prompt file {str(path)!r} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                        "expected one prompt a line or a CSV with a 'prompt' column") from None
    except csv.Error as exc:
        raise DataError(f"prompt file {str(path)!r}: not a valid CSV file ({exc})") from None
    except OSError as exc:
        raise DataError(f"prompt file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if categories:
        ps = ps.filter_categories(categories)
        if not ps.prompts:
            raise DataError(f"{path}: no prompt has any of the categories {', '.join(map(repr, categories))}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"--limit: expected an integer >= 1, got {limit!r}")
        ps = ps.subset(range(min(limit, len(ps))))
    return ps


def write_prompts(path: str | os.PathLike, prompts: Sequence[str] | PromptSet) -> Path:
    """Write prompts: ``.csv`` with a ``prompt`` column (and I2P columns a :class:`PromptSet` has), else text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ps = prompts if isinstance(prompts, PromptSet) else PromptSet(list(prompts))
    if path.suffix.lower() == ".csv":
        cols = ["prompt"]
        if ps.seeds is not None:
            cols.append("evaluation_seed")
        if ps.guidance is not None:
            cols.append("evaluation_guidance")
        if ps.categories is not None:
            cols.append("categories")
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for i, p in enumerate(ps.prompts):
                row: list = [p]
                if ps.seeds is not None:
                    row.append(ps.seeds[i])
                if ps.guidance is not None:
                    row.append(ps.guidance[i])
                if ps.categories is not None:
                    row.append(",".join(ps.categories[i]))
                w.writerow(row)
    else:
        bad = [p for p in ps.prompts if "\n" in p]
        if bad:
            raise DataError(f"{path}: prompt {bad[0]!r} contains a newline; write a .csv file instead")
        path.write_text("".join(p + "\n" for p in ps.prompts), encoding="utf-8")
    return path
