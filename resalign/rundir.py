"""The run directory of every command, and crash-safe writes.

Layout (DESIGN.md): ``config.toml`` (fully resolved), ``model/`` (diffusers layout, safetensors),
``checkpoints/`` (resumable), ``metrics.jsonl``, ``report.md``, ``report.json``, plots (``*.png``).
Every file is written to a temporary name and renamed into place, so a crash or Ctrl-C never leaves a
half-written checkpoint or report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resalign.errors import ConfigError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def default_out(command: str, root: str | os.PathLike = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{command}-{stamp}"


class RunDir:
    """One command's output folder."""

    def __init__(self, path: str | os.PathLike, *, command: str, resume: bool = False):
        self.path = Path(path)
        self.command = command
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {str(self.path)!r} exists and is not a directory")
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            if not (self.path / "checkpoints").is_dir():
                raise ConfigError(
                    f"--out {str(self.path)!r} is not empty; choose a new folder or pass --resume to continue a run"
                )
        self.path.mkdir(parents=True, exist_ok=True)

    # paths -------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def file(self, name: str) -> Path:
        return self.path / name

    # writers -----------------------------------------------------------
    def write_config(self, config: Mapping[str, Any]) -> Path:
        import tomli_w

        return atomic_write_text(self.path / "config.toml", tomli_w.dumps(_toml_clean(config)))

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (flushed and fsynced)."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(row), default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)


def _toml_clean(obj: Any) -> Any:
    """Make a config mapping TOML-serialisable: drop None, stringify paths, tuples to lists."""
    if isinstance(obj, Mapping):
        return {str(k): _toml_clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_toml_clean(v) for v in obj if v is not None]
    if isinstance(obj, Path):
        return str(obj)
    return obj
