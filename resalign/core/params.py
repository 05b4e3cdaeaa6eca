"""Which parameters are unlearned: θ and its map to UNet weights W(θ) (``--params full|xattn|lora``).

* ``full`` — θ is every UNet weight (the paper, Sec. 3): W(θ) = θ;
* ``xattn`` — θ is the cross-attention weights (``attn2``), the rest stays at θ_0;
* ``lora`` — θ is rank-r LoRA factors on attention projections, W(θ) = W_0 + s·B A, merged at the
  end (what the authors' code trains; their init: A ~ N(0, 0.008²), B ~ N(0, 0.002²)).

Simulated fine-tuning, the Hessian and the solvers always work on W (all UNet weights, the space
downstream fine-tuning changes); the hypergradient reaches θ through the vector-Jacobian product of
W(θ), which is exact for the chain rule ∇_θ = (∂W/∂θ)ᵀ ∇_W.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from resalign.components import Params
from resalign.errors import ConfigError

PARAM_KINDS = ("full", "xattn", "lora")


@dataclass
class ParamsOptions:
    """Options of ``--params lora`` (ignored by the other choices)."""

    rank: int = 4
    alpha: float = 4.0
    targets: list[str] = field(default_factory=lambda: ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"])
    init_std_a: float = 0.008
    init_std_b: float = 0.002


def _matches(module: str, targets: list[str]) -> bool:
    """peft's rule: a module matches a target equal to its name or to a dotted suffix of it."""
    return any(module == t or module.endswith("." + t) for t in targets)


class Parameterization:
    """θ ↦ W(θ); ``init`` gives θ at the original model (fp32 master copies)."""

    def __init__(self, kind: str, base: Params, options: ParamsOptions | None = None, seed: int = 0):
        if kind not in PARAM_KINDS:
            raise ConfigError(f"params {kind!r}: expected one of {', '.join(PARAM_KINDS)}")
        self.kind = kind
        self.base = base
        self.options = options or ParamsOptions()
        self.seed = seed
        if kind == "xattn":
            self.names = [k for k in base if ".attn2." in k]
        elif kind == "lora":
            self.names = [k for k in base if k.endswith(".weight") and base[k].ndim == 2
                          and _matches(k.rsplit(".", 1)[0], self.options.targets)]
        else:
            self.names = list(base)
        if not self.names:
            raise ConfigError(f"params {kind!r}: the UNet has no parameter of that kind")

    @property
    def scaling(self) -> float:
        return self.options.alpha / self.options.rank

    def init(self) -> Params:
        if self.kind != "lora":
            return {k: self.base[k].detach().clone().float() for k in self.names}
        g = torch.Generator().manual_seed(self.seed)
        r, theta = self.options.rank, {}
        for k in self.names:
            out_f, in_f = self.base[k].shape
            dev = self.base[k].device
            theta[k + ".lora_A"] = (torch.randn(r, in_f, generator=g) * self.options.init_std_a).to(dev)
            theta[k + ".lora_B"] = (torch.randn(out_f, r, generator=g) * self.options.init_std_b).to(dev)
        return theta

    def weights(self, theta: Params) -> Params:
        """W(θ): every UNet weight, differentiable in θ."""
        if self.kind == "full":
            return dict(theta)
        if self.kind == "xattn":
            return {**self.base, **theta}
        out = dict(self.base)
        for k in self.names:
            out[k] = self.base[k] + self.scaling * (theta[k + ".lora_B"] @ theta[k + ".lora_A"])
        return out

    @torch.no_grad()
    def merged(self, theta: Params) -> Params:
        """W(θ) detached: the unlearned UNet's state dict."""
        return {k: v.detach() for k, v in self.weights(theta).items()}
