"""Image scorers: built-in plugin, registered through the same hook as third-party packages.

Each scorer module exposes ``SCORERS``: the component classes it provides.
"""

from __future__ import annotations

import importlib

from resalign.hookspecs import hookimpl

SCORER_MODULES: tuple[str, ...] = (
    "resalign.scorers.nudenet",
    "resalign.scorers.onnx_classifier",
    "resalign.scorers.frechet",
    "resalign.scorers.clip",
    "resalign.scorers.personalization",
    "resalign.scorers.aesthetic",
    "resalign.scorers.unsafe",
    "resalign.scorers.toy",
)


@hookimpl
def register_scorers(register):
    for modname in SCORER_MODULES:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:  # not written yet in this tree
                continue
            raise
        for cls in module.SCORERS:
            register(cls.name, cls)
