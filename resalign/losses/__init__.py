"""Harmful losses L_harmful (Eq. 3): built-in plugin, registered through the same hook as third-party packages."""

from __future__ import annotations

from resalign.hookspecs import hookimpl


@hookimpl
def register_harmful_losses(register):
    pass
