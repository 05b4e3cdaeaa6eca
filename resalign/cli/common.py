"""The flags every command takes, defined once: ``--out``, ``--quiet``, ``--set``, ``--device``,
``--dtype`` and ``--threads``, and the resolution of a command's settings from them.

``--set KEY=VALUE`` (repeatable) is a setting of the configuration the command resolves, with the
value syntax of :func:`resalign.config.parse_value`; it is applied after the other flags and before
validation. Where a flag has no meaning for a command, :func:`refuse` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import typer

from resalign.errors import ConfigError

T = TypeVar("T")

QUIET_HELP = "No progress bars and no result tables: print only where the output went."
SET_HELP = ("A setting of {what} as KEY=VALUE, repeatable; dotted KEYs for nested settings, the VALUE a TOML value "
            "(3, 1e-3, true, [5, 10], {{rank = 4}}; a bare word is a string); applied after the other flags{eg}.")
DEVICE_HELP = "Torch device: cpu | cuda | cuda:N"
DTYPE_HELP = "Compute dtype: fp32 | bf16 | fp16"
THREADS_HELP = "Torch CPU threads (0: torch's default)"


def out_option(what: str) -> Any:
    """``--out``: where the command writes ``what``."""
    return typer.Option(None, "--out", help=what)


def quiet_option(help: str = QUIET_HELP) -> Any:
    return typer.Option(False, "--quiet", "-q", help=help)


def set_option(what: str, example: str = "") -> Any:
    eg = f", e.g. {example}" if example else ""
    return typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP.format(what=what, eg=eg))


def device_option(default: str | None = "cpu", help: str = DEVICE_HELP) -> Any:
    return typer.Option(default, "--device", help=help + ".")


def dtype_option(default: str | None = "fp32", help: str = DTYPE_HELP) -> Any:
    return typer.Option(default, "--dtype", help=help + ".")


def threads_option(default: int | None = 1, help: str = THREADS_HELP) -> Any:
    return typer.Option(default, "--threads", help=help + ".")


def alias_option(*names: str) -> Any:
    """A former name of a flag, still accepted and hidden from ``--help``."""
    return typer.Option(None, *names, hidden=True)


def pick(flag: str, value: Any, alias: str, alias_value: Any) -> Any:
    """The value of a flag given under its name or under its former name ``alias`` (not both)."""
    if alias_value is None:
        return value
    if value is not None:
        raise ConfigError(f"{flag} and {alias} are the same flag ({alias} is its former name); give {flag} only")
    return alias_value


def refuse(command: str, flag: str, value: Any, why: str) -> None:
    """A common flag that ``command`` has no use for: given, it is an error saying why."""
    if value is not None:
        raise ConfigError(f"{command} {flag}: {why}")


def resolve(cls: type[T], command: str, flags: Mapping[str, Any], items: Sequence[str] | None) -> T:
    """The settings ``cls`` of ``command``: the flags' values (``None``: the dataclass default), then
    the ``--set`` items; unknown keys and mistyped values raise :class:`ConfigError`."""
    from resalign.config import from_dict, parse_items

    raw = parse_items(items, "--set", {k: v for k, v in flags.items() if v is not None}, cls=cls,
                      what=f"{command}'s settings")
    return from_dict(cls, raw, where=f"{command} settings")


def set_torch_threads(threads: int | None) -> None:
    """``--threads N`` (0 or None: torch's default) for a command that only uses torch through the
    libraries it calls."""
    from resalign.validation import check_int

    check_int(threads, "--threads", ge=0, optional=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
