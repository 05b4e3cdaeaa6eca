"""SVDiff (Han et al. 2023): train only spectral shifts δ of W = U diag(σ) Vᵀ.

W' = U diag(relu(σ + δ)) Vᵀ, with U, σ, V the SVD of the (reshaped) base weight and δ = 0 at the
start. The merged parameters are written W + U diag(relu(σ + δ) − σ) Vᵀ so that θ_FT stays a function
of θ in the differentiable path; the singular vectors are treated as constants of the adaptation
(differentiating through the SVD is ill-conditioned for repeated singular values).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from resalign.adapters.base import MergedAdapter
from resalign.components import Params
from resalign.errors import ConfigError


class SVDiff(MergedAdapter):
    name: ClassVar[str] = "svdiff"
    paper_lr: ClassVar[float] = 1e-3  # mkshing/svdiff-pytorch

    @dataclass
    class Config:
        #: regular expressions on weight names; empty = every linear and convolution weight
        include: list[str] = field(default_factory=list)
        #: SVDiff trains δ with a much larger learning rate than full fine-tuning (paper: 1e-3 vs 5e-6)
        lr_multiplier: float = 1.0

    def lr_multiplier(self) -> float:
        return self.config.lr_multiplier

    def targets(self, theta: Params) -> list[str]:
        pats = [re.compile(p) for p in self.config.include]
        out = [
            k for k, v in theta.items()
            if k.endswith(".weight") and v.ndim in (2, 4) and (not pats or any(p.search(k) for p in pats))
        ]
        if not out:
            raise ConfigError(f"adapter 'svdiff': no weight matches {self.config.include}")
        return out

    def init(self, theta: Params, generator: torch.Generator | None) -> Params:
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        phi: Params = {}
        for k in self.targets(theta):
            w = theta[k].detach()
            u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1).float(), full_matrices=False)
            self._svd[k] = (u.to(w.dtype), s.to(w.dtype), vh.to(w.dtype))
            phi[k + ".delta"] = torch.zeros_like(s, dtype=w.dtype)
        return phi

    def merge(self, theta: Params, phi: Params) -> Params:
        out = dict(theta)
        for k, (u, s, vh) in self._svd.items():
            shift = torch.relu(s + phi[k + ".delta"]) - s
            out[k] = theta[k] + ((u * shift) @ vh).reshape(theta[k].shape)
        return out
