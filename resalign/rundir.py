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
import secrets
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resalign.errors import ConfigError, DataError, RunDirLocked

#: The lock file inside a run directory, held (``fcntl.flock``) by the process writing it.
LOCK_FILE = ".resalign.lock"


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new file next to ``name`` in ``folder``, created with mode 0666 less the umask (like ``open``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(folder / f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name!r} in {str(folder)!r}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file gets the mode a plain ``open`` would give it (0666 less the umask: 0644 under umask 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
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


class _Lock:
    """An exclusive ``flock`` on a run directory's lock file; released when closed or garbage-collected
    (and by the kernel when the process ends, however it ends)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self) -> None:
        self.close()


#: Locks this process holds, by run directory: a second RunDir on the same folder in the same process
#: shares the lock rather than contending with itself.
_HELD: weakref.WeakValueDictionary[str, _Lock] = weakref.WeakValueDictionary()


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def _busy(path: Path, lock_path: Path) -> RunDirLocked:
    return RunDirLocked(f"--out {str(path)} is in use by another resalign process ({_holder(lock_path)})")


def lock_run_dir(path: str | os.PathLike) -> _Lock | None:
    """Take the exclusive lock of run directory ``path`` (which must exist), or raise
    :class:`RunDirLocked` naming the process that holds it. None where ``fcntl`` is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    path = Path(path)
    key = str(path.resolve())
    held = _HELD.get(key)
    if held is not None and held.fd is not None:
        return held
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise ConfigError(f"--out {str(path)!r}: cannot create its lock file {LOCK_FILE}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(path, lock_path) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    lock = _Lock(fd, lock_path)
    _HELD[key] = lock
    return lock


def _check_free(path: Path) -> None:
    """Raise :class:`RunDirLocked` when another process holds ``path``'s lock (without taking it)."""
    lock_path = path / LOCK_FILE
    if not lock_path.is_file() or _HELD.get(str(path.resolve())) is not None:
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(path, lock_path) from None
    finally:
        os.close(fd)


class RunDir:
    """One command's output folder, locked against a second writer while this object lives.

    The lock is released when the RunDir is closed (:meth:`close`, or leaving a ``with`` block), when
    it is garbage-collected, and in any case when the process ends; a lock file left behind by a
    process that died does not block.
    """

    def __init__(self, path: str | os.PathLike, *, command: str, resume: bool = False):
        self.path = Path(path)
        self.command = command
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {str(self.path)!r} exists and is not a directory")
        if self.path.is_dir():
            _check_free(self.path)
            if not resume and any(p.name != LOCK_FILE for p in self.path.iterdir()):
                if not (self.path / "checkpoints").is_dir():
                    raise ConfigError(
                        f"--out {str(self.path)!r} is not empty; choose a new folder or pass --resume to continue a run"
                    )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {str(self.path)!r} cannot be created: {exc.strerror or exc}") from None
        self._lock = lock_run_dir(self.path)

    def close(self) -> None:
        """Give up this object's hold on the lock; it is released once no RunDir of this process holds it."""
        self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
        """The rows of ``metrics.jsonl`` (:func:`read_metrics`)."""
        return read_metrics(self.path)

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


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (none when it is missing); a last line cut short by a crash
    (no final newline) is left out, a bad line elsewhere is a :class:`DataError`."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    text = p.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) and not text.endswith("\n"):
                break
            raise DataError(f"{str(p)!r}: line {i} is not a JSON object") from None
    return rows
