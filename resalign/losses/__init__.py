"""Harmful losses L_harmful (Eq. 3) and fine-tuning losses L_FT: built-in plugin, registered through the same hooks as third-party packages."""

from __future__ import annotations

from resalign.hookspecs import hookimpl
from resalign.losses.finetune import FINETUNE_LOSSES
from resalign.losses.harmful import HARMFUL_LOSSES


@hookimpl
def register_harmful_losses(register):
    for cls in HARMFUL_LOSSES:
        register(cls.name, cls)


@hookimpl
def register_finetune_losses(register):
    for cls in FINETUNE_LOSSES:
        register(cls.name, cls)
