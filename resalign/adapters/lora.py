"""LoRA (Hu et al. 2022) as a merged delta: W' = W + s·B A on the targeted layers.

Rank, alpha, target modules and rsLoRA scaling are read from a :class:`peft.LoraConfig`. The delta
follows peft's math: s = alpha / r (alpha / √r with rsLoRA), A ~ U(±1/√fan_in) (kaiming-uniform,
a = √5), B = 0; for convolutions A is (r, in, k, k) and B (out, r, 1, 1), merged as
(B·A.flatten).reshape(W.shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from resalign.adapters._peft import PeftDelta, check_rank
from resalign.components import Params


class LoRA(PeftDelta):
    name: ClassVar[str] = "lora"
    paper_lr: ClassVar[float] = 1e-4  # train_text_to_image_lora.py
    factors: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    @dataclass
    class Config:
        rank: int = 4
        alpha: float = 4.0
        targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
        use_rslora: bool = False

        def __post_init__(self):
            check_rank(self.rank)

    def peft_config(self):
        from peft import LoraConfig

        c = self.config
        return LoraConfig(r=c.rank, lora_alpha=c.alpha, target_modules=list(c.targets), use_rslora=c.use_rslora)

    @property
    def scaling(self) -> float:
        c = self.config
        return c.alpha / (math.sqrt(c.rank) if c.use_rslora else c.rank)

    def init_factors(self, w: torch.Tensor, generator: torch.Generator | None) -> Params:
        r = self.config.rank
        bound = 1.0 / math.sqrt(int(w[0].numel()))
        a = (torch.rand((r, *w.shape[1:]), generator=generator, dtype=torch.float32) * 2 - 1) * bound
        b_shape = (w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())
        return {"lora_A": a, "lora_B": torch.zeros(b_shape)}

    def delta(self, weight: torch.Tensor, f: Params) -> torch.Tensor:
        a, b = f["lora_A"], f["lora_B"]
        return self.scaling * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
