"""``cg``: conjugate-gradient solver for the hypergradient system (I + γH) x = g (Eq. 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from resalign.components import Component, HypergradProblem, HypergradResult, Params
from resalign.hookspecs import hookimpl


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a)


def _axpy(alpha: float, x: Params, y: Params) -> Params:
    """alpha * x + y."""
    return {k: y[k] + alpha * x[k] for k in y}


class ConjugateGradient(Component):
    """Conjugate gradients on A x = g with A = I + γ∇²L_FT(θ_FT), one HVP per iteration."""

    name: ClassVar[str] = "cg"
    needs_trajectory: ClassVar[bool] = False

    @dataclass
    class Config:
        K: int = 5  # CG iterations (HVPs)
        tol: float = 1e-6  # stop when ‖r_k‖ ≤ tol·‖g‖

        def __post_init__(self) -> None:
            if self.K < 0:
                raise ValueError(f"K must be >= 0, got {self.K}")

    def solve(self, problem: HypergradProblem) -> HypergradResult:
        gamma = problem.gamma
        g = {k: v.detach() for k, v in problem.grad_harm.items()}

        def apply_a(v: Params) -> Params:
            hv = problem.hvp_ft(v)
            return {k: v[k] + gamma * hv[k] for k in v}

        x = {k: torch.zeros_like(v) for k, v in g.items()}
        r = dict(g)
        p = dict(g)
        rr = _dot(r, r)
        g_norm = rr.sqrt().item()
        residuals = [g_norm]
        negative_curvature = False
        for _ in range(self.config.K):
            if residuals[-1] <= self.config.tol * max(g_norm, 1e-30):
                break
            ap = apply_a(p)
            pap = _dot(p, ap)
            if pap <= 0:
                negative_curvature = True
                if not any(v.abs().sum() > 0 for v in x.values()):
                    x = dict(g)
                break
            alpha = (rr / pap).item()
            x = _axpy(alpha, p, x)
            r = _axpy(-alpha, ap, r)
            rr_new = _dot(r, r)
            residuals.append(rr_new.sqrt().item())
            beta = (rr_new / rr).item()
            p = _axpy(beta, p, r)
            rr = rr_new
        return HypergradResult(
            hypergrad=x,
            diagnostics={"residuals": residuals, "iterations": len(residuals) - 1, "negative_curvature": negative_curvature},
        )


@hookimpl
def register_solvers(register):
    register("cg", ConjugateGradient)
