"""The separately installed plugin package under plugins/resalign-cg, as a user gets it."""

from __future__ import annotations

import json

import torch

from resalign.components import HypergradProblem
from resalign.registry import build_registry


def test_entry_point_plugin_is_listed_with_its_distribution(capsys):
    from resalign import registry
    from resalign.cli import main

    registry.reset_registry()
    try:
        assert main(["plugins", "--json", "--kind", "solver"]) == 0
    finally:
        registry.reset_registry()
    rows = json.loads(capsys.readouterr().out)["components"]
    cg = [r for r in rows if r["name"] == "cg"]
    assert cg, "install plugins/resalign-cg (pip install plugins/resalign-cg)"
    assert cg[0]["distribution"] == "resalign-cg" and cg[0]["kind"] == "solver"


def test_cg_solves_the_moreau_envelope_system_on_a_quadratic():
    torch.manual_seed(0)
    d, gamma = 12, 0.7
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    eig = torch.linspace(-0.9, 20.0, d, dtype=torch.float64)  # I + γH stays positive definite
    h = q @ torch.diag(eig) @ q.T
    g = torch.randn(d, dtype=torch.float64)
    problem = HypergradProblem(
        theta={"w": torch.zeros(d, dtype=torch.float64)},
        theta_ft={"w": torch.zeros(d, dtype=torch.float64)},
        grad_harm={"w": g},
        hvp_ft=lambda v: {"w": h @ v["w"]},
        gamma=gamma,
    )
    solver = build_registry().create("solver", "cg", {"K": d, "tol": 1e-12})
    x = solver.solve(problem).hypergrad["w"]
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) + gamma * h, g)
    assert torch.allclose(x, exact, rtol=1e-8, atol=1e-10)


def test_cg_stops_on_negative_curvature_instead_of_diverging():
    d = 4
    h = torch.diag(torch.tensor([-5.0, 1.0, 2.0, 3.0], dtype=torch.float64))  # I + H indefinite
    g = torch.ones(d, dtype=torch.float64)
    problem = HypergradProblem({}, {}, {"w": g}, lambda v: {"w": h @ v["w"]}, gamma=1.0)
    result = build_registry().create("solver", "cg", {"K": 10}).solve(problem)
    assert result.diagnostics["negative_curvature"]
    assert torch.isfinite(result.hypergrad["w"]).all()
