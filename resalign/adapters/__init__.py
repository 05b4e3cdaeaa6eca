"""ADAPT methods: built-in plugin, registered through the same hook as third-party packages.

Each returns θ_FT in the base parameter space (deltas merged): ``full``, ``dreambooth``, ``lora``,
``loha``, ``lokr``, ``svdiff``, ``custom_diffusion``. The same classes run the simulated ADAPT of
Alg. 2 and downstream fine-tuning (:mod:`resalign.eval.protocol.finetune`).
"""

from __future__ import annotations

from resalign.adapters.full import CustomDiffusion, DreamBooth, FullFinetune
from resalign.adapters.lora import LoRA
from resalign.adapters.lycoris import LoHa, LoKr
from resalign.adapters.svdiff import SVDiff
from resalign.hookspecs import hookimpl

ADAPTERS = (FullFinetune, LoRA, SVDiff, CustomDiffusion, DreamBooth, LoHa, LoKr)


@hookimpl
def register_adapters(register):
    for cls in ADAPTERS:
        register(cls.name, cls)
