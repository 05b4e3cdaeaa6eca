"""Solver fidelity on an analytic quadratic problem: every figure equals its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from resalign.components import HypergradProblem
from resalign.core.fidelity import cosine, measure, relative_error
from resalign.registry import build_registry

D, T, ETA = 8, 6, 0.05


def _quadratic(seed: int = 0):
    """L_FT(w) = ½ wᵀHw − bᵀw (SGD for T steps from θ), L_harm(w) = ½‖w − c‖²."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    eig = torch.linspace(0.2, 3.0, D, dtype=torch.float64)
    h = q @ torch.diag(eig) @ q.T
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    c = torch.randn(D, generator=gen, dtype=torch.float64)
    theta = {"w": torch.randn(D, generator=gen, dtype=torch.float64).requires_grad_(True)}

    def adapt(w):
        for _ in range(T):
            w = w - ETA * (h @ w - b)
        return w

    def harm_loss(p):
        return 0.5 * ((p["w"] - c) ** 2).sum()

    with torch.no_grad():
        theta_ft = {"w": adapt(theta["w"])}
    g = {"w": theta_ft["w"] - c}

    def make_problem(gamma: float) -> HypergradProblem:
        return HypergradProblem(
            theta=theta,
            theta_ft=theta_ft,
            grad_harm=g,
            hvp_ft=lambda v: {"w": h @ v["w"]},
            gamma=gamma,
            unroll=lambda: {"w": adapt(theta["w"])},
            harm_loss=harm_loss,
        )

    jacobian = torch.linalg.matrix_power(torch.eye(D, dtype=torch.float64) - ETA * h, T)
    exact = {"w": jacobian @ g["w"]}
    return h, g, exact, make_problem


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def test_exact_reference_is_the_unrolled_derivative(registry):
    h, g, exact, make_problem = _quadratic()
    m = measure(registry.create("solver", "unrolled"), make_problem(1.0), exact)
    assert m.cosine == pytest.approx(1.0, abs=1e-12)
    assert m.relative_error == pytest.approx(0.0, abs=1e-12)


def test_first_order_fidelity_is_the_cosine_of_g_and_the_jacobian_product(registry):
    h, g, exact, make_problem = _quadratic()
    m = measure(registry.create("solver", "first-order"), make_problem(1.0), exact)
    assert m.cosine == pytest.approx(_cos(g["w"], exact["w"]), rel=1e-10)
    rel = float((g["w"] - exact["w"]).norm() / exact["w"].norm())
    assert m.relative_error == pytest.approx(rel, rel=1e-10)


@pytest.mark.parametrize("K", [1, 2, 3, 5])
@pytest.mark.parametrize("gamma", [0.1, 0.3])
def test_richardson_fidelity_is_that_of_the_truncated_neumann_series(registry, K, gamma):
    h, g, exact, make_problem = _quadratic()
    solver = registry.create("solver", "richardson", {"K": K, "omega": gamma, "tol": 0.0, "x0": "zero"})
    m = measure(solver, make_problem(gamma), exact)
    neumann = sum(torch.linalg.matrix_power(-gamma * h, k) @ g["w"] for k in range(K))
    assert m.cosine == pytest.approx(_cos(neumann, exact["w"]), rel=1e-9)
    assert m.relative_error == pytest.approx(float((neumann - exact["w"]).norm() / exact["w"].norm()), rel=1e-9)


def test_converged_moreau_solution_fidelity_matches_the_closed_form(registry):
    h, g, exact, make_problem = _quadratic()
    gamma = T * ETA  # the proximal step matching T gradient steps to first order
    solver = registry.create("solver", "richardson", {"K": 200, "tol": 1e-14})
    m = measure(solver, make_problem(gamma), exact)
    moreau = torch.linalg.solve(torch.eye(D, dtype=torch.float64) + gamma * h, g["w"])
    assert m.cosine == pytest.approx(_cos(moreau, exact["w"]), rel=1e-8)
    first = measure(registry.create("solver", "first-order"), make_problem(gamma), exact)
    assert m.cosine > first.cosine  # (I + γH)^-1 g tracks Π(I - ηH) g better than g does


def test_cosine_and_relative_error_helpers():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0])}
    b = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([0.0])}
    assert cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert relative_error(a, b) == pytest.approx(1 / math.sqrt(2))
    assert cosine(a, {"x": torch.zeros(2), "y": torch.zeros(1)}) == 0.0


def test_measure_reports_time_and_memory(registry):
    h, g, exact, make_problem = _quadratic()
    m = measure(registry.create("solver", "richardson", {"K": 3}), make_problem(1.0), exact)
    assert m.seconds > 0 and "x_norms" in m.diagnostics

    class Hungry:
        """First-order, but holds a 64 MiB buffer (touched) for 60 ms while it 'solves'."""

        name, needs_trajectory = "hungry", False

        def __init__(self, mib):
            self.mib = mib

        def solve(self, problem):
            import time

            from resalign.components import HypergradResult

            buf = torch.ones(self.mib * 2**20 // 4) if self.mib else None
            time.sleep(0.06)
            del buf
            return HypergradResult(dict(problem.grad_harm))

    hungry, lean = measure(Hungry(64), make_problem(1.0), exact), measure(Hungry(0), make_problem(1.0), exact)
    assert hungry.peak_mb >= 0.9 * 64, hungry.peak_mb  # the measured peak sees the allocation
    assert lean.peak_mb < 16, lean.peak_mb
    assert hungry.seconds >= 0.06 and lean.seconds >= 0.06
