"""First-order hypergradient: ∂θ_FT/∂θ ≈ I, so ∇_θ L_harm(θ_FT) ≈ g = ∇L_harm at θ_FT (Appendix E.1)."""

from __future__ import annotations

from typing import ClassVar

from resalign.components import Component, HypergradProblem, HypergradResult
from resalign.errors import SolverError
from resalign.ops import all_finite, norm


class FirstOrder(Component):
    name: ClassVar[str] = "first-order"
    needs_trajectory: ClassVar[bool] = False

    def solve(self, problem: HypergradProblem) -> HypergradResult:
        g = {k: v.detach() for k, v in problem.grad_harm.items()}
        if not all_finite(g):
            raise SolverError("first-order: the harmful gradient at θ_FT is not finite (the simulated fine-tuning diverged)")
        return HypergradResult(g, {"solver": self.name, "g_norm": norm(g), "hvps": 0})
