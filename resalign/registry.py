"""The one pluggy PluginManager and the typed component registry built from its catalog hooks.

Built-ins are registered from :data:`DEFAULT_PLUGINS` through the same hooks as entry-point plugins
(group ``resalign``). Loading of third-party plugins is guarded: one that raises on import is recorded
in :data:`load_errors`, shown by ``resalign plugins`` and skipped, unless ``RESALIGN_STRICT_PLUGINS=1``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from resalign import hookspecs
from resalign.components import KINDS, Component, MethodRecipe
from resalign.errors import DuplicateComponentError, PluginError, UnknownComponentError

#: Modules holding the built-in hook implementations, registered like any plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "resalign.losses",
    "resalign.regularizers",
    "resalign.adapters",
    "resalign.solvers",
    "resalign.scorers",
    "resalign.models.loaders",
    "resalign.methods",
)

ENTRY_POINT_GROUP = "resalign"

_HOOK_OF_KIND = {
    "harmful-loss": "register_harmful_losses",
    "regularizer": "register_regularizers",
    "adapter": "register_adapters",
    "solver": "register_solvers",
    "finetune-loss": "register_finetune_losses",
    "scorer": "register_scorers",
    "model": "register_models",
    "method": "register_methods",
}


@dataclass(frozen=True)
class ComponentInfo:
    kind: str
    name: str
    component: Any
    plugin: str  # the plugin (module) name that registered it
    distribution: str  # the installed distribution providing it
    version: str
    origin: str = ""  # the module of the hook that registered it

    @property
    def module(self) -> str:
        """Where the component is defined: its class's (or function's) module; for an instance
        such as a :class:`~resalign.components.MethodRecipe`, the module that registered it."""
        if isinstance(self.component, type) or callable(self.component) or not self.origin:
            return getattr(self.component, "__module__", type(self.component).__module__)
        return self.origin


@dataclass(frozen=True)
class LoadError:
    entry_point: str
    distribution: str
    error: str


def _strict() -> bool:
    return os.environ.get("RESALIGN_STRICT_PLUGINS", "").lower() in {"1", "true", "yes"}


def _validate_name(kind: str, name: str, plugin: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or name.lower() != name:
        raise PluginError(
            f"plugin {plugin!r} registered {kind} name {name!r}: names must be non-empty lowercase strings"
        )


class Registry:
    """Components by (kind, name), with the plugin and distribution that provided each."""

    def __init__(self, pm: pluggy.PluginManager, load_errors: list[LoadError]):
        self.pm = pm
        self.load_errors = load_errors
        self._items: dict[str, dict[str, ComponentInfo]] = {k: {} for k in KINDS}
        self._collect()

    def _dist_of(self, plugin: object) -> tuple[str, str]:
        for p, dist in self.pm.list_plugin_distinfo():
            if p is plugin:
                return dist.metadata["name"], dist.version
        from resalign import __version__

        return "resalign", __version__

    def _collect(self) -> None:
        for kind, hook_name in _HOOK_OF_KIND.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                plugin_name = impl.plugin_name
                dist, version = self._dist_of(impl.plugin)
                origin = getattr(impl.plugin, "__name__", None) or type(impl.plugin).__module__

                def register(name: str, component: Any, *, _kind=kind, _p=plugin_name, _d=dist, _v=version,
                             _o=origin):
                    self._add(ComponentInfo(_kind, name, component, _p, _d, _v, _o))

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:  # a plugin whose hook raises is reported like an import error
                    if _strict():
                        raise PluginError(f"plugin {plugin_name!r} failed in {hook_name}: {exc}") from exc
                    self.load_errors.append(LoadError(plugin_name, dist, f"{hook_name}: {exc!r}"))

    def _add(self, info: ComponentInfo) -> None:
        _validate_name(info.kind, info.name, info.plugin)
        if info.kind == "method" and not isinstance(info.component, MethodRecipe):
            raise PluginError(f"plugin {info.plugin!r} registered method {info.name!r} as "
                              f"{type(info.component).__name__}: expected a resalign.components.MethodRecipe")
        existing = self._items[info.kind].get(info.name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{info.kind} {info.name!r} is registered twice: by {existing.plugin!r} "
                f"({existing.distribution} {existing.version}) and by {info.plugin!r} "
                f"({info.distribution} {info.version})"
            )
        self._items[info.kind][info.name] = info

    # ---------------------------------------------------------------- queries
    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self._items[kind])

    def infos(self, kind: str | None = None) -> list[ComponentInfo]:
        kinds = [kind] if kind else list(KINDS)
        for k in kinds:
            self._check_kind(k)
        return [self._items[k][n] for k in kinds for n in sorted(self._items[k])]

    def info(self, kind: str, name: str) -> ComponentInfo:
        self._check_kind(kind)
        try:
            return self._items[kind][name]
        except KeyError:
            available = sorted(self._items[kind])
            close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown {kind} {name!r}{hint} (available: {', '.join(available) or 'none'})"
            ) from None

    def get(self, kind: str, name: str) -> Any:
        """The registered class (or object) of ``kind`` called ``name``."""
        return self.info(kind, name).component

    def create(self, kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
        """Instantiate a component from its options (validated by :meth:`Component.make`)."""
        cls = self.get(kind, name)
        where = f"{kind} {name!r}"
        if isinstance(cls, type) and issubclass(cls, Component):
            return cls.make(options, where=where)
        if isinstance(cls, type):
            return cls(**(options or {}))
        if options:
            raise PluginError(f"{where} is an instance and takes no options")
        return cls

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise UnknownComponentError(f"unknown component kind {kind!r} (kinds: {', '.join(KINDS)})")


def make_plugin_manager(
    *, entry_points: bool = True, extra_plugins: tuple[object, ...] = ()
) -> tuple[pluggy.PluginManager, list[LoadError]]:
    """A fresh PluginManager with built-ins, entry-point plugins (guarded) and ``extra_plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    errors: list[LoadError] = []
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    if entry_points and os.environ.get("RESALIGN_DISABLE_PLUGIN_AUTOLOAD", "") not in {"1", "true"}:
        _load_entry_points(pm, errors)
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm, errors


def _load_entry_points(pm: pluggy.PluginManager, errors: list[LoadError]) -> None:
    blocked = {b.strip() for b in os.environ.get("RESALIGN_BLOCKED_PLUGINS", "").split(",") if b.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.metadata["name"] if ep.dist is not None else "?"
        if ep.name in blocked or dist in blocked or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            if _strict():
                raise PluginError(f"plugin {ep.name!r} from {dist} failed to load: {exc!r}") from exc
            errors.append(LoadError(ep.name, dist, repr(exc)))
            continue
        if ep.dist is not None:
            pm._plugin_distinfo.append((plugin, pluggy._manager.DistFacade(ep.dist)))  # noqa: SLF001


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (built lazily on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        pm, errors = make_plugin_manager()
        _REGISTRY = Registry(pm, errors)
    return _REGISTRY


def build_registry(*, entry_points: bool = True, extra_plugins: tuple[object, ...] = ()) -> Registry:
    """A new, independent registry (tests register plugin objects through ``extra_plugins``)."""
    pm, errors = make_plugin_manager(entry_points=entry_points, extra_plugins=extra_plugins)
    return Registry(pm, errors)


def reset_registry() -> None:
    global _REGISTRY
    _REGISTRY = None


def get(kind: str, name: str) -> Any:
    return get_registry().get(kind, name)


def create(kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
    return get_registry().create(kind, name, options)
