"""ADAPT methods: built-in plugin, registered through the same hook as third-party packages.

Each returns θ_FT in the base parameter space (deltas merged): ``full``, ``lora``, ``svdiff``,
``custom_diffusion``.
"""

from __future__ import annotations

from resalign.adapters.full import CustomDiffusion, FullFinetune
from resalign.adapters.lora import LoRA
from resalign.adapters.svdiff import SVDiff
from resalign.hookspecs import hookimpl

ADAPTERS = (FullFinetune, LoRA, SVDiff, CustomDiffusion)


@hookimpl
def register_adapters(register):
    for cls in ADAPTERS:
        register(cls.name, cls)
