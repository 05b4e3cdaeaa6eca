"""Configuration files (TOML), ``KEY=VALUE`` settings, and their validation into dataclasses.

``--config FILE.toml`` holds everything a command needs; command-line flags override it; the run
directory records the fully resolved result in ``config.toml``.

Every ``KEY=VALUE`` flag (``--set``, ``--scorer-option``, ``--unlearn-option``) is read by
:func:`parse_item`: ``KEY`` is a dotted path (``pool.lrs``, ``scorer_options.nudenet.threshold``) and
``VALUE`` one TOML value (``3``, ``1e-3``, ``true``, ``[5, 10]``, ``{rank = 4}``, ``"text"``); a value
that is not valid TOML on one line (a bare word such as ``cuda:1`` or ``A,B``) is that text, a string.
Numbers must be finite (``nan`` and ``inf`` are refused).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from resalign.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (a TOML file expected)") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    return loads_toml(text, f"config file {str(path)!r}")


def loads_toml(text: str, where: str) -> dict[str, Any]:
    """Parse TOML ``text``; syntax errors (and nesting too deep to parse) name ``where``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested too deeply") from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, recursively for tables; ``None`` values in override are ignored."""
    out = dict(base)
    for k, v in override.items():
        if v is None:
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_value(text: str, where: str) -> Any:
    """The value of a ``KEY=VALUE`` item: one TOML value, else the stripped text itself (a string).

    ``where`` (the flag and item) starts every error: several lines, more than one value, non-finite
    numbers and values nested too deeply are refused.
    """
    text = text.strip()
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        if "\n" in text or "\r" in text:
            raise ConfigError(f"{where}: the value spans several lines; give one TOML value") from None
        if text.lower().lstrip("+-") in _NON_FINITE:
            raise ConfigError(f"{where}: expected a finite number, got {text}") from None
        return text
    except RecursionError:
        raise ConfigError(f"{where}: the value is nested too deeply") from None
    if set(parsed) != {"v"}:
        raise ConfigError(f"{where}: expected one TOML value after '='")
    if not _finite(parsed["v"]):
        raise ConfigError(f"{where}: expected a finite number, got {text}")
    return parsed["v"]


#: Spellings of non-finite numbers that are refused rather than read as strings (JSON's among them).
_NON_FINITE = ("nan", "inf", "infinity")


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def parse_item(item: str, flag: str) -> tuple[list[str], Any]:
    """``"pool.lrs=[1e-3]"`` -> ``(["pool", "lrs"], [0.001])``: the dotted key and :func:`parse_value`'s value.

    Errors name ``flag`` and the item (no ``=``, an empty key or key part).
    """
    key, sep, text = item.partition("=")
    where = f"{flag} {item!r}"
    if not sep:
        raise ConfigError(f"{where}: expected KEY=VALUE")
    keys = [k.strip() for k in key.split(".")]
    if not all(keys):
        raise ConfigError(f"{where}: expected KEY=VALUE with a dotted KEY such as pool.lrs")
    return keys, parse_value(text, where)


def parse_items(items: Sequence[str] | None, flag: str, into: dict[str, Any] | None = None,
                cls: type | None = None, what: str = "") -> dict[str, Any]:
    """Apply ``KEY=VALUE`` ``items`` (see :func:`parse_item`) to the table ``into`` (a new one by default).

    Dotted keys make nested tables. With a dataclass ``cls`` every key must name a setting of it
    (nested dataclasses followed; below a table-valued field any key is accepted): an unknown key
    raises :class:`ConfigError` naming it and the valid ones (``what`` names the settings).
    """
    out = {} if into is None else into
    for item in items or ():
        keys, value = parse_item(item, flag)
        if cls is not None:
            check_key(cls, keys, f"{flag} {item!r}", what)
        table = out
        for k in keys[:-1]:
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{flag} {item!r}: {k!r} is not a table")
        table[keys[-1]] = value
    return out


def check_key(cls: type, keys: Sequence[str], where: str, what: str = "") -> None:
    """Whether the dotted ``keys`` name a setting of dataclass ``cls``; else :class:`ConfigError`
    naming the unknown key and the valid ones."""
    tp: Any = cls
    for i, key in enumerate(keys):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            if _is_table(tp):
                return
            raise ConfigError(f"{where}: {'.'.join(keys[:i])!r} is a single value, not a table")
        names = [f.name for f in dataclasses.fields(tp)]
        key = aliases(tp).get(key, key)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"{where}: unknown key {key!r}{' in ' + '.'.join(keys[:i]) if i else ''}"
                              f"{' of ' + what if what else ''}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                              f"valid keys: {', '.join(names)}")
        tp = _unwrap_optional(typing.get_type_hints(tp)[key])


def aliases(cls: type) -> dict[str, str]:
    """Former names of settings of ``cls`` still read (its ``ALIASES`` class attribute: old -> new)."""
    return dict(getattr(cls, "ALIASES", {}))


def current_names(cls: type, data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """The table ``data`` of dataclass ``cls`` with former names of settings (:func:`aliases`) replaced
    by the present ones, in nested tables too; giving both names is a :class:`ConfigError`."""
    renamed = aliases(cls)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in renamed:
            if renamed[key] in data:
                raise ConfigError(f"{where}: {key!r} and {renamed[key]!r} are the same setting (its former and "
                                  f"present name); give {renamed[key]!r} only")
            key = renamed[key]
        tp = _unwrap_optional(hints.get(key))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            value = current_names(tp, value, f"{where}.{key}")
        out[key] = value
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _is_table(tp: Any) -> bool:
    return tp is Any or tp is dict or typing.get_origin(tp) in (dict, Mapping)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses.

    Unknown keys raise :class:`ConfigError` naming ``where.key`` and the closest valid key; values are
    checked against the field's annotated type (int/float/str/bool, lists, nested dataclasses). A
    former name of a setting (:func:`aliases`) is read as the setting.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in current_names(cls, data, where).items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


#: scalar setting types: which TOML values each accepts (an integer is a number, a boolean is neither)
_SCALARS: dict[type, tuple[Any, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        seq = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")
        return float(value) if tp is float else value
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain dicts, for ``config.toml`` and ``report.json`` settings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
