"""Low-rank deltas on the layers a peft config targets: the shared part of LoRA, LoHa and LoKr.

Layer matching uses peft's own ``check_target_module_exists``, so the same ``targets`` select the same
layers as ``unet.add_adapter(<peft config>)``. A method names its factors per weight (``init_factors``)
and their product ΔW (``delta``); φ holds them as ``<weight name>.<factor>`` and
merge(θ, φ) = θ + ΔW(φ) on each targeted weight.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from resalign.adapters.base import MergedAdapter
from resalign.components import Params
from resalign.errors import ConfigError


def module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(w, a=√5)``, peft's initialisation of its factors, from ``generator``."""
    return torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


class PeftDelta(MergedAdapter):
    """θ + ΔW(φ) on the 2-D (linear) and 4-D (convolution) weights of the targeted modules."""

    #: every factor name a method may use (a weight's φ holds a subset of them)
    factors: ClassVar[tuple[str, ...]] = ()

    def peft_config(self):
        """The peft config with the same options (its ``target_modules`` select the layers)."""
        raise NotImplementedError

    def init_factors(self, weight: torch.Tensor, generator: torch.Generator | None) -> Params:
        raise NotImplementedError

    def delta(self, weight: torch.Tensor, f: Params) -> torch.Tensor:
        raise NotImplementedError

    @property
    def scaling(self) -> float:
        c = self.config
        return c.alpha / c.rank

    def targets(self, theta: Params) -> list[str]:
        """Weight names (2-D linear or 4-D conv) of the modules the config targets."""
        from peft.tuners.tuners_utils import check_target_module_exists

        cfg = self.peft_config()
        out = [
            k for k, v in theta.items()
            if k.endswith(".weight") and v.ndim in (2, 4) and check_target_module_exists(cfg, module_of(k))
        ]
        if not out:
            raise ConfigError(f"adapter {self.name!r}: no layer matches targets {self.config.targets}")
        return out

    def init(self, theta: Params, generator: torch.Generator | None) -> Params:
        phi: Params = {}
        for k in self.targets(theta):
            w = theta[k]
            for f, v in self.init_factors(w, generator).items():
                phi[f"{k}.{f}"] = v.to(w.device, w.dtype)
        return phi

    def merge(self, theta: Params, phi: Params) -> Params:
        out = dict(theta)
        for k in theta:
            f = {name: phi[f"{k}.{name}"] for name in self.factors if f"{k}.{name}" in phi}
            if f:
                out[k] = theta[k] + self.delta(theta[k], f).reshape(theta[k].shape)
        return out


def check_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
