"""resalign: resilient safety unlearning of text-to-image diffusion models (ResAlign).

Layers, top to bottom: ``cli`` -> ``pipeline`` -> ``core`` -> ``registry``/``hookspecs`` -> built-in
plugins (``losses``, ``regularizers``, ``adapters``, ``solvers``, ``scorers``) -> ``models``/``data``/
``eval`` -> ``_native`` (Rust).
"""

from __future__ import annotations

__version__ = "0.1.0"

from resalign.errors import ResAlignError  # noqa: E402

__all__ = ["__version__", "ResAlignError"]
