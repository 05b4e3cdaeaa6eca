"""Utility regularizers R(θ) (Eq. 3): built-in plugin, registered through the same hook as third-party packages."""

from __future__ import annotations

from resalign.hookspecs import hookimpl
from resalign.regularizers.distill import REGULARIZERS


@hookimpl
def register_regularizers(register):
    for cls in REGULARIZERS:
        register(cls.name, cls)
