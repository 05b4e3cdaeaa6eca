"""Sharpness-aware twin: the harmful gradient at the worst nearby point, ∇L_harm(θ + ρ·g/‖g‖), g = ∇L_harm(θ).

A reference method for the same goal as Eq. 3 (a model whose harmful loss stays low when its weights
move), without simulating any fine-tuning and without a Hessian: sharpness-aware minimisation
(Foret et al. 2021) replaces L_harm(θ) by max_{‖ε‖ ≤ ρ} L_harm(θ + ε) ≈ L_harm(θ + ρ ĝ), ĝ = g/‖g‖, and
takes its gradient at the perturbed point (SAM's first-order form: the dependence of ĝ on θ is dropped).
L_harm is the loss unlearning *minimises* (for GA the negative denoising loss), so the worst nearby
point is an ascent step on it: θ + ρ ĝ.

As a solver it returns h = ∇L_harm(θ + ρ ĝ) for the β term of Alg. 2, with g and the perturbed
gradient both taken through ``problem.harm_loss`` (the simulation's harmful pairs and noise); ĝ and ρ
live in the weight space W the hypergradients live in (the run's θ is pulled back afterwards, as for
every solver). It ignores θ_FT, g = ∇L_harm(θ_FT) and the curvature: the simulated fine-tuning that
built the problem only serves the health checks and the logged L_harm(θ_FT). Cost: two harmful
gradients per simulation, no HVP.

``rho`` (default 0.03) is the L2 radius of the neighbourhood in W, set where the ascent step raises
L_harm about as much as the toy pool's simulated fine-tuning does: at the first outer step of the toy
default (J = 2; Adam, lr 1e-4, T = 60, which moves W by 0.62) L_harm(θ_FT) was 0.0195 and 0.0138 from
L_harm(θ) = 0.0055 and 0.0033, and L_harm(θ + ρĝ) was 0.0113 / 0.0090 at ρ = 0.02, 0.0161 / 0.0148 at
ρ = 0.03 and 0.029 / 0.032 at ρ = 0.05 (SAM's usual radius). It is a toy-world figure: another model
or pool needs its own (``--set solver_options.rho=...``). ``rho = 0`` returns ∇L_harm(θ), the twin's
gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from resalign.components import Component, HypergradProblem, HypergradResult
from resalign.errors import SolverError
from resalign.ops import aliases, all_finite, grads_or_zeros, norm


class SharpnessAware(Component):
    name: ClassVar[str] = "sam"
    needs_trajectory: ClassVar[bool] = False

    @dataclass
    class Config:
        #: L2 radius of the ascent step θ + ρ·g/‖g‖ in the weight space W
        rho: float = 0.03

        def __post_init__(self) -> None:
            if not (math.isfinite(self.rho) and self.rho >= 0):
                raise ValueError(f"rho must be a finite number >= 0, got {self.rho}")

    def solve(self, problem: HypergradProblem) -> HypergradResult:
        if problem.harm_loss is None:
            raise SolverError("solver 'sam' needs the problem's harm_loss closure")
        rho = float(self.config.rho)
        at = aliases(problem.theta)
        loss = problem.harm_loss(at)
        g = grads_or_zeros(torch.autograd.grad(loss, list(at.values()), allow_unused=True), at)
        g_norm = norm(g)
        if not math.isfinite(g_norm):
            raise SolverError("solver 'sam': the harmful gradient at θ is not finite")
        step = rho / g_norm if g_norm > 0 else 0.0
        with torch.no_grad():
            perturbed = {k: (v.detach() + step * g[k]).requires_grad_(True) for k, v in problem.theta.items()}
        del g
        loss_p = problem.harm_loss(perturbed)
        h = grads_or_zeros(torch.autograd.grad(loss_p, list(perturbed.values()), allow_unused=True), perturbed)
        if not all_finite(h):
            raise SolverError("solver 'sam': the harmful gradient at θ + ρĝ is not finite")
        return HypergradResult(h, {
            "solver": self.name, "rho": rho, "grad_theta_norm": g_norm, "harm_theta": float(loss.detach()),
            "harm_perturbed": float(loss_p.detach()), "x_norm": norm(h), "hvps": 0,
        })
