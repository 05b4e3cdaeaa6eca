"""Checks of user-given settings that every command shares: numbers, devices, option trees.

Each check raises :class:`~resalign.errors.ConfigError` naming the field (or flag) and what was
expected, e.g. ``outer_lr: expected a finite number > 0, got nan``. They run before any model is
loaded or image generated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from resalign.errors import ConfigError

#: The largest seed accepted (torch and numpy both take any seed in [0, 2**63)).
MAX_SEED = 2**63 - 1

_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(gt=None, ge=None, lt=None, le=None) -> str:
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if lt is not None:
        parts.append(f"< {lt:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    return " and ".join(parts)


def check_number(value: Any, where: str, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None, optional: bool = False) -> None:
    """``value`` is a finite real number within the given bounds (None allowed when ``optional``)."""
    if value is None and optional:
        return
    bounds = _bounds(gt, ge, lt, le)
    want = "a finite number" + (f" {bounds}" if bounds else "")
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected {want}, got {value!r}")
    if (gt is not None and not value > gt) or (ge is not None and not value >= ge) \
            or (lt is not None and not value < lt) or (le is not None and not value <= le):
        raise ConfigError(f"{where}: expected {want}, got {value!r}")


def check_int(value: Any, where: str, *, ge: int | None = None, le: int | None = None,
              optional: bool = False) -> None:
    """``value`` is an integer (not a bool) within the given bounds (None allowed when ``optional``)."""
    if value is None and optional:
        return
    bounds = _bounds(ge=ge, le=le)
    want = "an integer" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected {want}, got {value!r}")
    if (ge is not None and value < ge) or (le is not None and value > le):
        raise ConfigError(f"{where}: expected {want}, got {value!r}")


def check_seed(value: Any, where: str = "seed") -> None:
    check_int(value, where, ge=0, le=MAX_SEED)


def check_numbers(values: Iterable[Any], where: str, **bounds: Any) -> None:
    """Every item of a list setting with :func:`check_number` (``where[i]`` in messages)."""
    for i, v in enumerate(values):
        check_number(v, f"{where}[{i}]", **bounds)


def check_ints(values: Iterable[Any], where: str, **bounds: Any) -> None:
    for i, v in enumerate(values):
        check_int(v, f"{where}[{i}]", **bounds)


def check_finite_tree(obj: Any, where: str) -> None:
    """Every number in a dataclass / mapping / list tree is finite (no NaN or infinity)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            check_finite_tree(getattr(obj, f.name), f"{where}.{f.name}")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            check_finite_tree(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite_tree(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{where}: expected a finite number, got {obj!r}")


def check_choice(value: Any, where: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")


def check_device(device: Any, where: str = "--device") -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (N below the number of visible GPUs) or ``mps`` where available."""
    expected = "cpu, cuda, cuda:N or mps"
    m = _DEVICE.match(device) if isinstance(device, str) else None
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise ConfigError(f"{where}: expected {expected}, got {device!r}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return device
    import torch

    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{where}: {device!r} requested but MPS is not available on this machine")
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: {device!r} requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ConfigError(f"{where}: {device!r} requested but only {count} CUDA device(s) are visible "
                          f"(cuda:0 to cuda:{count - 1})")
    return device


def check_dtype(dtype: Any, device: str, where: str = "--dtype", *, fp16_needs_cuda: bool = True) -> None:
    """A compute dtype of :data:`resalign.models.bundle.DTYPES` (fp16 only on CUDA unless told otherwise)."""
    from resalign.models.bundle import DTYPES

    if dtype not in DTYPES:
        raise ConfigError(f"{where}: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if fp16_needs_cuda and dtype == "fp16" and not str(device).startswith("cuda"):
        raise ConfigError(f"{where}: fp16 needs --device cuda (use bf16 or fp32 on the CPU)")


__all__ = ["MAX_SEED", "check_choice", "check_device", "check_dtype", "check_finite_tree", "check_int",
           "check_ints", "check_number", "check_numbers", "check_seed"]
