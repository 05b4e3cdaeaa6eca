"""Sweeps of independent cells: each recorded when finished, skipped on ``--resume``, split over ranks.

``attack`` (one cell per fine-tuning seed), ``compare`` (unlearning runs, strength matching, every
evaluation before and after fine-tuning) and ``ablate`` (fidelity seeds, effect runs) are sweeps: lists
of cells whose results do not depend on one another within a phase. A :class:`Sweep` runs such a list:

* every :class:`Cell` has a stable key, a readable name plus a hash of everything that determines its
  result (the sweep's settings and the cell's own), so a cell whose settings changed is never reused;
* a finished cell is recorded atomically in ``DIR/cells/`` (``KEY.json``, and ``KEY.safetensors`` for
  its arrays, written first so that the JSON file marks a complete record; no pickle);
* with ``--resume`` the recorded cells are read back instead of recomputed, and the sweep continues at
  the first unfinished one; the settings must be those recorded in ``cells/sweep.json`` (a changed
  setting is a :class:`~resalign.errors.ConfigError` naming it, before any work);
* under ``torchrun`` rank r computes the cells i ≡ r (mod world size) (:func:`resalign.distributed.my_indices`),
  each inside :func:`resalign.distributed.solo` so that its own work (an unlearning run, an
  evaluation) is not split again, records it, and the results are gathered on every rank in cell order,
  so the merged report is the single-process one. Rank 0 alone holds the run directory's lock and
  writes its config and report; the run directory must be on a filesystem every rank sees.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resalign import distributed
from resalign.errors import ConfigError, ResAlignError, RunInterrupted
from resalign.rundir import RunDir, atomic_write_bytes, atomic_write_json

CELLS_DIR = "cells"
SWEEP_FILE = "sweep.json"


def canonical(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples become lists, keys strings, paths strings), in its order."""
    return json.loads(json.dumps(obj, default=_default))


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-")[:80]


@dataclass(frozen=True)
class Cell:
    """One independent piece of a sweep: ``name`` for people, ``settings`` for the key."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """A cell's result: JSON-able ``value`` and named arrays (images), and the seconds it took."""

    value: Any
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def check_resumable(out: str | Path, command: str) -> None:
    """``--resume --out DIR`` needs a sweep to continue: ``DIR/cells/sweep.json``, written when a sweep
    starts. Anything else (a missing or empty folder, a folder of another kind) is a one-line
    :class:`~resalign.errors.ConfigError`, raised before any work."""
    path = Path(out)
    if not (path / CELLS_DIR / SWEEP_FILE).is_file():
        what = "does not exist" if not path.exists() else "holds no sweep (no cells/sweep.json)"
        raise ConfigError(f"--resume --out {str(path)!r}: {what}, nothing to resume; "
                          f"run {command} without --resume to start one")


class Sweep:
    """The cells of one command's run directory ``out`` (see the module docstring).

    ``settings`` are the command's settings; those that determine its results (all but the top-level
    keys in ``free``, such as torch threads) are recorded in ``cells/sweep.json`` and mixed into every
    cell's key.
    """

    def __init__(self, out: str | Path, *, command: str, settings: Mapping[str, Any], resume: bool = False,
                 free: Sequence[str] = ("threads",)):
        self.path = Path(out)
        self.command = command
        self.settings = canonical({k: v for k, v in settings.items() if k not in free})
        self.resume = resume
        self.reused = 0
        self.computed = 0
        self.run_dir: RunDir | None = None
        self._fingerprint = hashlib.sha256(json.dumps([command, self.settings], sort_keys=True,
                                                      default=_default).encode()).hexdigest()
        refused: ResAlignError | None = None
        if distributed.is_main():
            try:
                if resume:
                    check_resumable(self.path, command)
                self.run_dir = RunDir(self.path, command=command, resume=resume)
                self._check_settings()
                atomic_write_json(self.cells / SWEEP_FILE, {"command": command, "settings": self.settings})
            except ResAlignError as exc:
                refused = exc
        # every rank stops with rank 0's error (a busy or non-empty --out, changed settings), none waits
        refused = distributed.broadcast_object(refused)
        if refused is not None:
            raise refused

    @property
    def cells(self) -> Path:
        return self.path / CELLS_DIR

    def _check_settings(self) -> None:
        saved_file = self.cells / SWEEP_FILE
        if not saved_file.is_file():
            return
        if not self.resume:  # RunDir refuses a non-empty folder without --resume; be explicit anyway
            raise ConfigError(f"--out {str(self.path)!r} holds a {self.command} sweep; pass --resume to continue it")
        try:
            saved = json.loads(saved_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--resume: {str(saved_file)!r} is unreadable ({exc}); choose a new --out") from None
        if saved.get("command") != self.command:
            raise ConfigError(f"--resume: {str(self.path)!r} holds a {saved.get('command')!r} sweep, not {self.command!r}")
        old = saved.get("settings", {})
        for key in sorted(set(old) | set(self.settings)):
            if old.get(key) != self.settings.get(key):
                raise ConfigError(f"--resume: setting {key!r} differs from the one recorded in {str(saved_file)!r} "
                                  f"({old.get(key)!r} there, {self.settings.get(key)!r} now); resume with the "
                                  f"same settings or choose a new --out")

    def key(self, cell: Cell) -> str:
        """``NAME-HASH``: the hash covers the sweep's settings and the cell's own."""
        digest = hashlib.sha256(json.dumps([self._fingerprint, cell.name, canonical(dict(cell.settings))],
                                           sort_keys=True).encode()).hexdigest()
        return f"{_slug(cell.name)}-{digest[:16]}"

    def recorded(self, cell: Cell) -> Outcome | None:
        """The finished record of ``cell`` (None when it is not finished, or when not resuming)."""
        if not self.resume:
            return None
        key = self.key(cell)
        meta = self.cells / f"{key}.json"
        if not meta.is_file():
            return None
        record = json.loads(meta.read_text(encoding="utf-8"))
        arrays: dict[str, np.ndarray] = {}
        if record.get("arrays"):
            from safetensors.numpy import load_file

            arrays = load_file(str(self.cells / f"{key}.safetensors"))
        return Outcome(record["value"], arrays, float(record.get("seconds", 0.0)))

    def _record(self, cell: Cell, outcome: Outcome) -> None:
        """``KEY.safetensors`` (the arrays) first, then ``KEY.json``, which marks the record complete;
        the JSON also says which rank computed the cell."""
        key = self.key(cell)
        if outcome.arrays:
            from safetensors.numpy import save

            arrays = {k: np.ascontiguousarray(v) for k, v in outcome.arrays.items()}
            atomic_write_bytes(self.cells / f"{key}.safetensors", save(arrays))
        atomic_write_json(self.cells / f"{key}.json", {
            "name": cell.name, "settings": canonical(dict(cell.settings)), "seconds": outcome.seconds,
            "rank": distributed.rank(), "arrays": sorted(outcome.arrays), "value": outcome.value,
        })

    def run(self, cells: Sequence[Cell], compute: Callable[[Cell], Outcome | Any],
            on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
        """Every cell's outcome in order: recorded ones read back, this rank's others computed by
        ``compute`` (returning an :class:`Outcome` or a JSON-able value) and recorded, then all gathered.

        ``on_done(i, outcome)`` is called on this rank as each of its cells is read or computed.
        """
        mine: list[tuple[int, Outcome]] = []
        for i in distributed.my_indices(len(cells)):
            outcome = self.recorded(cells[i])
            if outcome is None:
                t0 = time.perf_counter()
                try:
                    with distributed.solo():
                        result = compute(cells[i])
                except (KeyboardInterrupt, RunInterrupted):
                    raise RunInterrupted(
                        f"{self.command} interrupted in cell {cells[i].name!r}; the finished cells are recorded in "
                        f"{str(self.cells)!r}; continue with the same command and --resume --out {str(self.path)}"
                    ) from None
                outcome = result if isinstance(result, Outcome) else Outcome(result)
                outcome.value = canonical(outcome.value)
                if not outcome.seconds:
                    outcome.seconds = time.perf_counter() - t0
                self._record(cells[i], outcome)
                self.computed += 1
            else:
                self.reused += 1
            mine.append((i, outcome))
            if on_done:
                on_done(i, outcome)
        return distributed.gather_items(mine, len(cells))

    def close(self) -> None:
        if self.run_dir is not None:
            self.run_dir.close()


__all__ = ["CELLS_DIR", "Cell", "Outcome", "Sweep", "canonical", "check_resumable"]
