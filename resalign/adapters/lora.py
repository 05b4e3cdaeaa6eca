"""LoRA (Hu et al. 2022) as a merged delta: W' = W + s·B A on the targeted layers.

Rank, alpha, target modules and rsLoRA scaling are read from a :class:`peft.LoraConfig`, and layer
matching uses peft's own ``check_target_module_exists``, so the same options select the same layers
as ``unet.add_adapter(LoraConfig(...))``. The delta follows peft's math: s = alpha / r (alpha / √r with
rsLoRA), A ~ U(±1/√fan_in) (kaiming-uniform, a = √5), B = 0; for convolutions A is (r, in, k, k) and
B (out, r, 1, 1), merged as (B·A.flatten).reshape(W.shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from resalign.adapters.base import MergedAdapter
from resalign.components import Params
from resalign.errors import ConfigError


def module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


class LoRA(MergedAdapter):
    name: ClassVar[str] = "lora"

    @dataclass
    class Config:
        rank: int = 4
        alpha: float = 4.0
        targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
        use_rslora: bool = False

        def __post_init__(self):
            if self.rank < 1:
                raise ValueError(f"rank must be >= 1, got {self.rank}")

    def peft_config(self):
        from peft import LoraConfig

        c = self.config
        return LoraConfig(r=c.rank, lora_alpha=c.alpha, target_modules=list(c.targets), use_rslora=c.use_rslora)

    @property
    def scaling(self) -> float:
        c = self.config
        return c.alpha / (math.sqrt(c.rank) if c.use_rslora else c.rank)

    def targets(self, theta: Params) -> list[str]:
        """Weight names (2-D linear or 4-D conv) of the modules the LoRA config targets."""
        from peft.tuners.tuners_utils import check_target_module_exists

        cfg = self.peft_config()
        out = [
            k for k, v in theta.items()
            if k.endswith(".weight") and v.ndim in (2, 4) and check_target_module_exists(cfg, module_of(k))
        ]
        if not out:
            raise ConfigError(f"adapter 'lora': no layer matches targets {self.config.targets}")
        return out

    def init(self, theta: Params, generator: torch.Generator | None) -> Params:
        r = self.config.rank
        phi: Params = {}
        for k in self.targets(theta):
            w = theta[k]
            fan_in = int(w[0].numel())
            bound = 1.0 / math.sqrt(fan_in)
            a_shape = (r, *w.shape[1:])
            a = (torch.rand(a_shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
            b_shape = (w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())
            phi[k + ".lora_A"] = a.to(w.device, w.dtype)
            phi[k + ".lora_B"] = torch.zeros(b_shape, device=w.device, dtype=w.dtype)
        return phi

    def delta(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        return self.scaling * d.reshape(weight.shape)

    def merge(self, theta: Params, phi: Params) -> Params:
        out = dict(theta)
        for k in theta:
            if k + ".lora_A" in phi:
                out[k] = theta[k] + self.delta(theta[k], phi[k + ".lora_A"], phi[k + ".lora_B"])
        return out
