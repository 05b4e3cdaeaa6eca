"""LoHa and LoKr (the LyCORIS family; Tab. 13's unseen methods) as merged deltas, with peft's math.

* LoHa (Hadamard product): ΔW = s · (W1a W1b) ⊙ (W2a W2b) on W reshaped to (out, in·k·k), W2b = 0 at
  the start (peft's ``LoHaConfig`` layers, ``use_effective_conv2d = False``).
* LoKr (Kronecker product): ΔW = s · W1 ⊗ W2 with out = a·b, in = c·d from peft's ``factorization``;
  W1 (a, c) or W1a W1b (``decompose_both``), W2 (b, d[, k, k]) or W2a W2b when the rank is below
  half its size; W1 = 0 at the start (peft's ``LoKrConfig`` layers).

s = alpha / r. Shapes, factorisation and initialisation follow peft's layers, and the Kronecker
product is peft's ``make_kron``, so a φ loaded into a peft model gives the same ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from resalign.adapters._peft import PeftDelta, check_rank, kaiming_uniform
from resalign.components import Params

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


class LoHa(PeftDelta):
    name: ClassVar[str] = "loha"
    paper_lr: ClassVar[float] = 1e-4  # as LoRA
    factors: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    @dataclass
    class Config:
        rank: int = 4
        alpha: float = 4.0
        targets: list[str] = field(default_factory=lambda: list(ATTENTION))

        def __post_init__(self):
            check_rank(self.rank)

    def peft_config(self):
        from peft import LoHaConfig

        c = self.config
        return LoHaConfig(r=c.rank, alpha=c.alpha, target_modules=list(c.targets))

    def init_factors(self, w: torch.Tensor, generator: torch.Generator | None) -> Params:
        r, out, fan_in = self.config.rank, w.shape[0], int(w[0].numel())
        return {
            "hada_w1_a": kaiming_uniform((out, r), generator),
            "hada_w1_b": kaiming_uniform((r, fan_in), generator),
            "hada_w2_a": kaiming_uniform((out, r), generator),
            "hada_w2_b": torch.zeros(r, fan_in),
        }

    def delta(self, weight: torch.Tensor, f: Params) -> torch.Tensor:
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * self.scaling


class LoKr(PeftDelta):
    name: ClassVar[str] = "lokr"
    paper_lr: ClassVar[float] = 1e-4  # as LoRA
    factors: ClassVar[tuple[str, ...]] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    @dataclass
    class Config:
        rank: int = 4
        alpha: float = 4.0
        targets: list[str] = field(default_factory=lambda: list(ATTENTION))
        decompose_both: bool = False
        decompose_factor: int = -1

        def __post_init__(self):
            check_rank(self.rank)

    def peft_config(self):
        from peft import LoKrConfig

        c = self.config
        return LoKrConfig(r=c.rank, alpha=c.alpha, target_modules=list(c.targets), decompose_both=c.decompose_both,
                          decompose_factor=c.decompose_factor)

    def init_factors(self, w: torch.Tensor, generator: torch.Generator | None) -> Params:
        from peft.tuners.lokr.layer import factorization

        c, r = self.config, self.config.rank
        a, b = factorization(w.shape[0], c.decompose_factor)
        cc, d = factorization(w.shape[1], c.decompose_factor)
        kernel = tuple(w.shape[2:])
        out: Params = {}
        if c.decompose_both and r < max(a, cc) / 2:
            out["lokr_w1_a"], out["lokr_w1_b"] = torch.zeros(a, r), kaiming_uniform((r, cc), generator)
        else:
            out["lokr_w1"] = torch.zeros(a, cc)
        if r >= max(b, d) / 2:
            out["lokr_w2"] = kaiming_uniform((b, d, *kernel), generator)
        else:
            k = int(torch.Size(kernel).numel())
            out["lokr_w2_a"], out["lokr_w2_b"] = kaiming_uniform((b, r), generator), kaiming_uniform((r, d * k), generator)
        return out

    def delta(self, weight: torch.Tensor, f: Params) -> torch.Tensor:
        from peft.tuners.lokr.layer import make_kron

        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        return make_kron(w1, w2, self.scaling)
