"""Unrolled differentiation: backpropagate L_harm(θ_FT(θ)) through the T simulated fine-tuning steps.

Exact for the simulated trajectory (∂θ_FT/∂θ = Π_t (I − η∇²L_FT(θ^(t))) for SGD), and the reference
the other solvers are compared with. Memory is O(T): the graph keeps every step's activations and a
copy of the trainable parameters (and, for Adam, its moments), roughly T times the memory of one
training step with ``create_graph=True``; the paper could unroll only 3 steps of SD v1.4 on an A100.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from resalign.components import Component, HypergradProblem, HypergradResult
from resalign.errors import SolverError
from resalign.ops import all_finite, norm


class Unrolled(Component):
    name: ClassVar[str] = "unrolled"
    needs_trajectory: ClassVar[bool] = True

    def solve(self, problem: HypergradProblem) -> HypergradResult:
        if problem.unroll is None or problem.harm_loss is None:
            raise SolverError("solver 'unrolled' needs the problem's unroll() and harm_loss closures")
        theta = problem.theta
        theta_ft = problem.unroll()
        loss = problem.harm_loss(theta_ft)
        grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        hyper = {k: (g.detach() if g is not None else torch.zeros_like(p)) for (k, p), g in zip(theta.items(), grads)}
        if not all_finite(hyper):
            raise SolverError("solver 'unrolled': non-finite hypergradient")
        return HypergradResult(hyper, {"solver": self.name, "loss_ft": float(loss.detach()), "x_norm": norm(hyper)})
