"""Full fine-tuning, DreamBooth (full with prior preservation) and CustomDiffusion (cross-attention K/V
only): φ is a subset of θ itself."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from resalign.adapters.base import MergedAdapter
from resalign.components import Params
from resalign.errors import ConfigError


class FullFinetune(MergedAdapter):
    """Every parameter of the base space is trained (the paper's evaluation fine-tuning)."""

    name: ClassVar[str] = "full"
    paper_lr: ClassVar[float] = 1e-5  # train_text_to_image.py

    @dataclass
    class Config:
        #: regular expressions on parameter names; empty = every parameter
        include: list[str] = field(default_factory=list)

    def select(self, theta: Params) -> list[str]:
        pats = [re.compile(p) for p in self.config.include]
        keys = [k for k in theta if not pats or any(p.search(k) for p in pats)]
        if not keys:
            raise ConfigError(f"adapter {self.name!r}: no parameter matches {self.config.include}")
        return keys

    def init(self, theta: Params, generator: torch.Generator | None) -> Params:
        return {k: theta[k] for k in self.select(theta)}

    def merge(self, theta: Params, phi: Params) -> Params:
        return {**theta, **phi}


class DreamBooth(FullFinetune):
    """DreamBooth (Ruiz et al. 2023): full fine-tuning with the prior-preservation loss L_inst + λ L_class
    on class images of the model before fine-tuning (``train_dreambooth.py``)."""

    name: ClassVar[str] = "dreambooth"
    paper_lr: ClassVar[float] = 5e-6
    finetune_loss: ClassVar[str | None] = "prior_preservation"


class CustomDiffusion(FullFinetune):
    """CustomDiffusion (Kumari et al. 2023): only the cross-attention key and value projections."""

    name: ClassVar[str] = "custom_diffusion"
    paper_lr: ClassVar[float] = 1e-5  # train_custom_diffusion.py

    @dataclass
    class Config:
        include: list[str] = field(default_factory=lambda: [r"attn2\.to_k\.", r"attn2\.to_v\."])
