"""Trajectory-accumulated harmful loss: the hypergradient of (1/T) Σ_{t=1..T} L_harm(θ_t) along the simulated
fine-tuning θ_1, …, θ_T = θ_FT, first-order in each iterate.

A reference method for the same goal as Eq. 3, after tamper-resistance training for language models
(Tamirisa et al. 2024), which accumulates the harmful loss over the adversary's fine-tuning steps
instead of taking it at the end only: a model whose harmful loss rebounds early in a fine-tuning is
penalised even where the last iterate happens to be low. Each term's θ-derivative is taken first-order,
dθ_t/dθ ≈ I (as the ``first-order`` solver does for θ_FT), so

    h = (1/|S|) Σ_{t ∈ S} ∇L_harm(θ_t),    S = {stride, 2·stride, … < T} ∪ {T}.

``stride`` (default 1: every iterate) evaluates every k-th iterate, counted from the start, and always
the last one; ``stride >= T`` leaves S = {T}, the first-order estimate. θ_0 = θ is not in S (its
gradient is already the (1 − β) term of Alg. 2).

The iterates come from ``problem.replay``: the simulated fine-tuning re-run without a graph (same
batches, noise and initialisation as the run that built the problem), each iterate's harmful gradient
taken when the adapter reaches it, nothing stored. The term at θ_T is the problem's g = ∇L_harm(θ_FT),
already computed. Cost: T fine-tuning steps again (the replay) and |S| − 1 harmful gradients, no HVP;
memory as a plain simulation plus one accumulator of the size of W. Recording the iterates during the
first run instead would save the replay at (|S| − 1)·|W| of memory; the problem does not do that.
The sum is accumulated in the parameters' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from resalign.components import Component, HypergradProblem, HypergradResult, Params
from resalign.errors import SolverError
from resalign.ops import add, aliases, all_finite, norm


class TrajectoryAccumulated(Component):
    name: ClassVar[str] = "trajectory"
    needs_trajectory: ClassVar[bool] = False  # the replay needs no graph (``unroll`` is not built)

    @dataclass
    class Config:
        #: evaluate the harmful gradient at every stride-th iterate (and always at θ_T = θ_FT)
        stride: int = 1

        def __post_init__(self) -> None:
            if self.stride < 1:
                raise ValueError(f"stride must be >= 1, got {self.stride}")

    def solve(self, problem: HypergradProblem) -> HypergradResult:
        if problem.replay is None or problem.harm_loss is None:
            raise SolverError("solver 'trajectory' needs the problem's replay and harm_loss closures")
        stride = int(self.config.stride)
        keys = list(problem.theta)
        total: Params = {k: problem.grad_harm[k].detach().clone() for k in keys}
        evaluated: list[int] = []
        losses: list[float] = []
        steps = [0]

        def visit(t: int, params: Params) -> None:
            steps[0] = t + 1
            if t == 0 or t % stride:
                return
            at = aliases({k: params[k] for k in keys})
            loss = problem.harm_loss({**params, **at})
            grads = torch.autograd.grad(loss, list(at.values()), allow_unused=True)
            with torch.no_grad():
                for k, g in zip(keys, grads):
                    if g is not None:
                        total[k].add_(g)
            evaluated.append(t)
            losses.append(float(loss.detach()))

        theta_T = problem.replay(visit)
        n = len(evaluated) + 1
        with torch.no_grad():
            for v in total.values():
                v.mul_(1.0 / n)
        if not all_finite(total):
            raise SolverError("solver 'trajectory': a harmful gradient along the fine-tuning is not finite")
        gap = norm(add({k: theta_T[k] for k in keys}, {k: problem.theta_ft[k] for k in keys}, -1.0))
        return HypergradResult(total, {
            "solver": self.name, "stride": stride, "iterates": evaluated + [steps[0]], "harm_iterates": losses,
            "replay_gap": gap, "x_norm": norm(total), "hvps": 0,
        })
