"""resalign: resilient safety unlearning of text-to-image diffusion models (ResAlign).

Python API: :func:`run`, :func:`evaluate`, :func:`attack`, :func:`compare` (:mod:`resalign.api`),
each returning a :class:`~resalign.api.Result` (``.run_dir``, ``.rows``).

Layers, top to bottom: ``cli`` -> ``api`` -> ``pipeline`` -> ``core`` -> ``registry``/``hookspecs`` -> built-in
plugins (``losses``, ``regularizers``, ``adapters``, ``solvers``, ``scorers``) -> ``models``/``data``/
``eval`` -> ``_native`` (Rust).
"""

from __future__ import annotations

__version__ = "0.1.0"

from resalign.errors import ResAlignError  # noqa: E402

#: The Python API (:mod:`resalign.api`), imported on first use so that ``import resalign`` stays light.
_API = ("run", "evaluate", "attack", "compare", "Result")

__all__ = ["__version__", "ResAlignError", *_API]


def __getattr__(name: str):
    if name in _API:
        from resalign import api

        return getattr(api, name)
    raise AttributeError(f"module 'resalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
