"""The plugin registry: registration, duplicates, guarded entry-point loading, unknown names."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest

from resalign.components import Component
from resalign.errors import ConfigError, DuplicateComponentError, PluginError, UnknownComponentError
from resalign.hookspecs import hookimpl
from resalign.registry import build_registry


class _HalvingSolver(Component):
    """Returns g / 2: a solver a third party might register."""

    name: ClassVar[str] = "halving"
    needs_trajectory: ClassVar[bool] = False

    @dataclass
    class Config:
        factor: float = 0.5

    def solve(self, problem):  # pragma: no cover - not called here
        raise NotImplementedError


class _Plugin:
    @hookimpl
    def register_solvers(self, register):
        register("halving", _HalvingSolver)


def test_registering_a_plugin_object_makes_its_component_available():
    reg = build_registry(entry_points=False, extra_plugins=(_Plugin(),))
    assert "halving" in reg.names("solver")
    solver = reg.create("solver", "halving", {"factor": 0.25})
    assert isinstance(solver, _HalvingSolver) and solver.config.factor == 0.25
    info = reg.info("solver", "halving")
    assert info.module == __name__


def test_options_are_validated_with_a_suggestion():
    reg = build_registry(entry_points=False, extra_plugins=(_Plugin(),))
    with pytest.raises(ConfigError, match="unknown option 'factr'.*did you mean 'factor'"):
        reg.create("solver", "halving", {"factr": 1})


def test_duplicate_name_is_an_error_naming_both_providers():
    class _Again:
        @hookimpl
        def register_solvers(self, register):
            register("halving", _HalvingSolver)

    with pytest.raises(DuplicateComponentError) as exc:
        build_registry(entry_points=False, extra_plugins=(_Plugin(), _Again()))
    message = str(exc.value)
    assert "'halving'" in message and message.count("by ") == 2


def test_unknown_name_lists_available_names_and_the_closest_match():
    reg = build_registry(entry_points=False, extra_plugins=(_Plugin(),))
    with pytest.raises(UnknownComponentError) as exc:
        reg.get("solver", "halvin")
    assert "did you mean 'halving'" in str(exc.value)
    assert "halving" in str(exc.value).split("available:")[1]
    with pytest.raises(UnknownComponentError, match="unknown component kind"):
        reg.names("optimiser")


def test_invalid_names_are_rejected():
    class _Bad:
        @hookimpl
        def register_solvers(self, register):
            register("Bad Name", _HalvingSolver)

    with pytest.raises(PluginError, match="lowercase"):
        build_registry(entry_points=False, extra_plugins=(_Bad(),))


@pytest.fixture
def broken_entry_point(tmp_path, monkeypatch):
    """An installed-looking distribution whose `resalign` entry point raises on import."""
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('plugin exploded on import')\n")
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [resalign]
        broken = broken_plugin
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    return "broken"


def test_plugin_that_raises_on_import_is_reported_and_skipped(broken_entry_point, monkeypatch):
    monkeypatch.delenv("RESALIGN_STRICT_PLUGINS", raising=False)
    reg = build_registry()
    errors = {e.entry_point: e for e in reg.load_errors}
    assert broken_entry_point in errors
    assert errors[broken_entry_point].distribution == "broken-plugin"
    assert "plugin exploded on import" in errors[broken_entry_point].error
    assert "diffusers" in reg.names("model")  # the tool still works


def test_strict_mode_fails_on_a_broken_plugin(broken_entry_point, monkeypatch):
    monkeypatch.setenv("RESALIGN_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken.*broken-plugin"):
        build_registry()


def test_cli_plugins_reports_the_broken_plugin(broken_entry_point, monkeypatch, capsys):
    import json

    from resalign import registry
    from resalign.cli import main

    monkeypatch.delenv("RESALIGN_STRICT_PLUGINS", raising=False)
    registry.reset_registry()
    try:
        assert main(["plugins", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert any(e["plugin"] == "broken" for e in out["errors"])
        monkeypatch.setenv("RESALIGN_STRICT_PLUGINS", "1")
        registry.reset_registry()
        assert main(["plugins"]) != 0
        assert "broken" in capsys.readouterr().err
    finally:
        registry.reset_registry()
