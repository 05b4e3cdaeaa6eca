"""ADAPT methods: built-in plugin, registered through the same hook as third-party packages."""

from __future__ import annotations

from resalign.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    pass
