"""Hypergradient solvers against closed forms on quadratic fine-tuning losses with known Hessian H."""

from __future__ import annotations

import pytest
import torch

from resalign.components import FinetuneConfig, HypergradProblem
from resalign.errors import ConfigError, SolverError
from resalign.registry import get_registry

D = 10


def spd(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))[0]
    return q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ q.T


def vec(seed=1, d=D):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def problem(h, g, gamma=1.0):
    return HypergradProblem(theta={"w": torch.zeros_like(g)}, theta_ft={"w": torch.zeros_like(g)},
                            grad_harm={"w": g}, hvp_ft=lambda v: {"w": h @ v["w"]}, gamma=gamma)


def solve(name, prob, **options):
    return get_registry().create("solver", name, options).solve(prob)


def test_richardson_solves_the_moreau_envelope_system_when_gamma_norm_h_below_one():
    gamma = 0.5
    h = spd(torch.linspace(0.0, 1.8, D))  # γ‖H‖ = 0.9
    g = vec()
    exact = torch.linalg.solve(torch.eye(D, dtype=torch.float64) + gamma * h, g)
    x = solve("richardson", problem(h, g, gamma), K=400, omega=gamma, tol=0.0).hypergrad["w"]
    assert torch.allclose(x, exact, atol=1e-5, rtol=0)
    # the default (λ_max-relaxed ω) reaches the same solution
    x = solve("richardson", problem(h, g, gamma), K=400, power_iters=30, tol=0.0).hypergrad["w"]
    assert torch.allclose(x, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8])
def test_richardson_truncation_is_the_neumann_series(K):
    gamma = 0.7
    h = spd(torch.linspace(-0.5, 1.2, D), seed=3)
    g = vec(2)
    neumann = sum(torch.linalg.matrix_power(-gamma * h, k) @ g for k in range(K))
    res = solve("richardson", problem(h, g, gamma), K=K, omega=gamma, tol=0.0, max_halvings=0, x0="zero")
    x = res.hypergrad["w"]
    assert torch.allclose(x, neumann, atol=1e-12)
    # error after K steps: x_K − x* = −(−γH)^K x*
    exact = torch.linalg.solve(torch.eye(D, dtype=torch.float64) + gamma * h, g)
    assert torch.allclose(x - exact, -torch.linalg.matrix_power(-gamma * h, K) @ exact, atol=1e-12)
    assert res.diagnostics["hvps"] == K - 1  # x_0 = 0 makes the first product free
    assert len(res.diagnostics["x_norms"]) == K and len(res.diagnostics["residuals"]) == K


def test_paper_setting_diverges_where_lambda_max_relaxation_converges():
    h = spd(torch.cat([torch.linspace(0.05, 5.0, D - 1), torch.tensor([60.0])]), seed=4)  # γλ_max = 60
    g = vec(5)
    exact = torch.linalg.solve(torch.eye(D, dtype=torch.float64) + h, g)
    # ω = γ = 1 (Eq. 7), no safeguards: the iterates blow up
    res = solve("richardson", problem(h, g), K=6, omega=1.0, safeguards=False)
    norms = res.diagnostics["x_norms"]
    assert norms[-1] > 1e6 * norms[0]
    # automatic ω = γ/(1 + γλ_max): converges to (I + γH)⁻¹ g
    res = solve("richardson", problem(h, g), K=1500, power_iters=60, tol=0.0)
    assert not res.diagnostics["fallback"]
    assert res.diagnostics["lambda_max"] == pytest.approx(60.0, rel=1e-3)
    assert res.diagnostics["omega"] == pytest.approx(1 / 61, rel=1e-3)
    assert torch.allclose(res.hypergrad["w"], exact, atol=1e-5, rtol=0)
    r = res.diagnostics["residuals"]
    assert all(b <= a for a, b in zip(r, r[1:]))


def test_safeguards_halve_omega_then_fall_back_to_first_order():
    h = spd(torch.linspace(0.0, 60.0, D), seed=6)
    g = vec(7)
    res = solve("richardson", problem(h, g), K=5, omega=1.0, max_halvings=8)
    assert res.diagnostics["halvings"] >= 5 and not res.diagnostics["fallback"]  # 1/2^5 · 61 < 2
    assert res.diagnostics["omega"] <= 2 / 61
    # I + H indefinite (an eigenvalue below −1/γ): no ω converges; the estimate falls back to g
    h_bad = torch.diag(torch.tensor([-5.0] + [1.0] * (D - 1), dtype=torch.float64))
    g = torch.ones(D, dtype=torch.float64)
    res = solve("richardson", problem(h_bad, g), K=12, omega=0.5, max_halvings=3)
    assert res.diagnostics["fallback"] and torch.equal(res.hypergrad["w"], g)
    with pytest.raises(SolverError, match="diverged"):
        solve("richardson", problem(h_bad, g), K=12, omega=0.5, max_halvings=1, fallback="error")


def test_lambda_max_is_cached_across_the_problems_of_an_outer_step():
    h = spd(torch.linspace(0.0, 10.0, D))
    calls = []

    def hvp(v):
        calls.append(1)
        return {"w": h @ v["w"]}

    cache = {}
    p1 = HypergradProblem({}, {}, {"w": vec(1)}, hvp, cache=cache)
    p2 = HypergradProblem({}, {}, {"w": vec(2)}, hvp, cache=cache)
    solve("richardson", p1, K=3, power_iters=7)
    n1 = len(calls)
    solve("richardson", p2, K=3, power_iters=7)
    assert n1 == 7 + 3 and len(calls) - n1 == 3  # power iterations once; K HVPs from x_0 = g


def test_lambda_max_is_warm_started_from_the_previous_outer_steps_eigenvector():
    """Outer step i+1's curvature is close to step i's: one product from the kept eigenvector (bf16)
    estimates its λ_max better than three from a random start, and the vector survives a resume."""
    eigs = torch.cat([torch.linspace(0.0, 5.0, D - 1), torch.tensor([10.0])])
    h1 = spd(eigs, seed=4)
    h2 = h1 + 0.05 * spd(torch.linspace(-1.0, 1.0, D), seed=5)  # the next outer step's curvature
    exact = float(torch.linalg.eigvalsh(h2)[-1])
    count = []

    def problem_at(h):
        def hvp(v):
            count.append(1)
            return {"w": h @ v["w"]}
        return HypergradProblem({}, {}, {"w": vec(1)}, hvp, cache={})

    solver = get_registry().create("solver", "richardson", {"K": 1, "power_iters": 30})
    solver.lambda_max(problem_at(h1))
    assert solver.state_dict()["hessian"]["w"].dtype == torch.bfloat16
    count.clear()
    warm, used = solver.lambda_max(problem_at(h2))
    assert used == 1 and len(count) == 1
    cold, _ = get_registry().create("solver", "richardson", {"K": 1, "power_iters": 3}).lambda_max(problem_at(h2))
    assert abs(warm - exact) < 0.02 * exact < abs(cold - exact)
    resumed = get_registry().create("solver", "richardson", {"K": 1, "power_iters": 30})
    resumed.load_state_dict(solver.state_dict())
    assert resumed.lambda_max(problem_at(h2)) == solver.lambda_max(problem_at(h2))  # both from the same vector


def test_a_warm_start_that_lost_the_dominant_mode_gets_the_remaining_power_iterations():
    """When the next curvature's dominant mode is orthogonal to the kept eigenvector, one product from
    it gives a Rayleigh quotient far below λ_max (and an ω too large for Eq. 6's iteration): the
    estimate falls below half the last λ_max, and the remaining power iterations recover it."""
    dt = vec(1).dtype
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(7), dtype=dt))
    eigs = torch.linspace(0.1, 1.0, D, dtype=dt)
    h1 = q @ torch.diag(torch.cat([torch.tensor([10.0], dtype=dt), eigs[1:]])) @ q.T  # dominant along q[:, 0]
    h2 = q @ torch.diag(torch.cat([eigs[:1], torch.tensor([10.0], dtype=dt), eigs[2:]])) @ q.T  # along q[:, 1]

    def problem_at(h):
        return HypergradProblem({}, {}, {"w": vec(1)}, lambda v: {"w": h @ v["w"]}, cache={})

    estimates = {}
    for accept in (0.0, 0.5):
        solver = get_registry().create("solver", "richardson", {"K": 1, "power_iters": 25, "warm_accept": accept})
        solver.lambda_max(problem_at(h1))
        estimates[accept] = solver.lambda_max(problem_at(h2))
    assert estimates[0.0][1] == 1 and estimates[0.0][0] < 1.0  # the quotient at q[:, 0] under h2 is 0.1
    assert estimates[0.5][1] == 25 and abs(estimates[0.5][0] - 10.0) < 0.5
    resumed = get_registry().create("solver", "richardson", {"K": 1, "power_iters": 25})
    resumed.load_state_dict(solver.state_dict())
    assert resumed.lambdas == solver.lambdas


def test_first_order_returns_g():
    g = vec(3)
    res = solve("first-order", problem(spd(torch.ones(D)), g))
    assert torch.equal(res.hypergrad["w"], g)


def test_unrolled_equals_the_product_of_sgd_jacobians():
    """T SGD steps on L_FT(w) = ½wᵀHw − bᵀw from θ: ∂θ_FT/∂θ = (I − ηH)^T, so the hypergradient of
    L_harm(w) = ½‖w − c‖² + Σ sin(w) is ((I − ηH)^T)ᵀ ∇L_harm(θ_FT)."""
    T, eta = 7, 0.05
    h = spd(torch.linspace(0.1, 8.0, D), seed=8)
    b, c = vec(9), vec(10)
    theta0 = {"w": vec(11)}

    def l_ft(p):
        w = p["w"]
        return 0.5 * w @ h @ w - b @ w

    def l_harm(p):
        return 0.5 * ((p["w"] - c) ** 2).sum() + torch.sin(p["w"]).sum()

    adapter = get_registry().create("adapter", "full")
    cfg = FinetuneConfig(adapter="full", lr=eta, steps=T, optimizer="sgd")
    theta = {"w": theta0["w"].clone().requires_grad_(True)}
    w_ft = adapter.adapt(theta, l_ft, cfg).theta_ft["w"].detach()
    prob = HypergradProblem(theta=theta, theta_ft={"w": w_ft}, grad_harm={"w": w_ft - c + torch.cos(w_ft)},
                            hvp_ft=lambda v: {"w": h @ v["w"]},
                            unroll=lambda: adapter.adapt(theta, l_ft, cfg, differentiable=True).theta_ft,
                            harm_loss=l_harm)
    x = solve("unrolled", prob).hypergrad["w"]
    jac = torch.linalg.matrix_power(torch.eye(D, dtype=torch.float64) - eta * h, T)
    assert torch.allclose(x, jac.T @ (w_ft - c + torch.cos(w_ft)), atol=1e-10)


def test_solver_options_are_validated():
    reg = get_registry()
    with pytest.raises(ConfigError, match="Kk"):
        reg.create("solver", "richardson", {"Kk": 3})
    with pytest.raises(ConfigError, match="omega_factor"):
        reg.create("solver", "richardson", {"omega_factor": 2.5})


def test_warm_start_from_g_converges_to_the_same_solution_faster_on_flat_directions():
    h = spd(torch.cat([torch.zeros(D - 2), torch.tensor([30.0, 60.0])]), seed=9)  # mostly flat, two stiff modes
    g = vec(12)
    exact = torch.linalg.solve(torch.eye(D, dtype=torch.float64) + h, g)
    cold = solve("richardson", problem(h, g), K=5, power_iters=40, x0="zero").hypergrad["w"]
    warm = solve("richardson", problem(h, g), K=5, power_iters=40, x0="grad").hypergrad["w"]
    assert torch.linalg.norm(warm - exact) < 0.2 * torch.linalg.norm(cold - exact)
    x = solve("richardson", problem(h, g), K=1500, power_iters=40, x0="grad", tol=0.0).hypergrad["w"]
    assert torch.allclose(x, exact, atol=1e-6)


@pytest.mark.parametrize("K", [1, 3, 5])
def test_warm_start_at_omega_gamma_is_the_neumann_series_one_term_longer(K):
    gamma = 0.7
    h = spd(torch.linspace(-0.5, 1.2, D), seed=3)
    g = vec(2)
    neumann = sum(torch.linalg.matrix_power(-gamma * h, k) @ g for k in range(K + 1))
    res = solve("richardson", problem(h, g, gamma), K=K, omega=gamma, tol=0.0, max_halvings=0, x0="grad")
    assert torch.allclose(res.hypergrad["w"], neumann, atol=1e-12)
    assert res.diagnostics["hvps"] == K


# --------------------------------------------------------------------------- reference methods: sam, trajectory


def quadratic_harm(a, b):
    """L_harm(θ) = ½ θᵀAθ + bᵀθ, whose gradient is Aθ + b."""
    def l_harm(p):
        w = p["w"]
        return 0.5 * w @ a @ w + b @ w
    return l_harm


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_sam_is_the_harmful_gradient_at_the_ascent_point(rho):
    a = spd(torch.linspace(-0.4, 3.0, D), seed=21)  # indefinite: the perturbed gradient is not a rescaling of g
    b, w = vec(22), vec(23)
    g = a @ w + b
    perturbed = w + rho * g / torch.linalg.norm(g)  # ascent on the loss unlearning minimises
    expected = a @ perturbed + b
    theta = {"w": w.clone().requires_grad_(True)}
    prob = HypergradProblem(theta=theta, theta_ft={"w": torch.full_like(w, 7.0)}, grad_harm={"w": torch.ones_like(w)},
                            hvp_ft=lambda v: v, harm_loss=quadratic_harm(a, b))
    res = solve("sam", prob, rho=rho)
    assert torch.allclose(res.hypergrad["w"], expected, atol=1e-12)
    assert res.diagnostics["grad_theta_norm"] == pytest.approx(float(torch.linalg.norm(g)))
    # the loss rose by about ρ‖g‖ (first order) and θ itself was not moved
    assert res.diagnostics["harm_perturbed"] - res.diagnostics["harm_theta"] == pytest.approx(
        rho * float(torch.linalg.norm(g)), rel=0.2)
    assert torch.equal(theta["w"].detach(), w)
    # ρ = 0 is the plain harmful gradient at θ (the twin's)
    assert torch.allclose(solve("sam", prob, rho=0.0).hypergrad["w"], g, atol=1e-12)


def test_sam_and_trajectory_options_are_validated():
    reg = get_registry()
    with pytest.raises(ConfigError, match="rho"):
        reg.create("solver", "sam", {"rho": -0.1})
    with pytest.raises(ConfigError, match="stride"):
        reg.create("solver", "trajectory", {"stride": 0})
    with pytest.raises(ConfigError, match="stride"):
        reg.create("solver", "trajectory", {"stride": 1.5})


def _sgd_trajectory_problem(T, eta):
    """L_FT(θ) = ½(θ − c)ᵀH(θ − c) fine-tuned by plain SGD through the real ``full`` adapter and
    :func:`replay_adapt`; L_harm = ½θᵀAθ + bᵀθ. Returns the problem and the closed-form iterates
    θ_t = c + (I − ηH)^t (θ_0 − c), t = 0..T."""
    from resalign.core.trajectory import replay_adapt

    h = spd(torch.linspace(0.2, 2.0, D), seed=31)
    a = spd(torch.linspace(0.5, 4.0, D), seed=32)
    b, c, w0 = vec(33), vec(34), vec(35)

    def l_ft(p):
        d = p["w"] - c
        return 0.5 * d @ h @ d

    step = torch.eye(D, dtype=torch.float64) - eta * h
    iterates = [c + torch.linalg.matrix_power(step, t) @ (w0 - c) for t in range(T + 1)]
    adapter = get_registry().create("adapter", "full")
    cfg = FinetuneConfig(adapter="full", lr=eta, steps=T, optimizer="sgd")
    theta = {"w": w0.clone().requires_grad_(True)}
    w_T = iterates[-1]
    prob = HypergradProblem(theta=theta, theta_ft={"w": w_T}, grad_harm={"w": a @ w_T + b},
                            hvp_ft=lambda v: {"w": h @ v["w"]}, harm_loss=quadratic_harm(a, b),
                            replay=lambda visit: replay_adapt(adapter, theta, l_ft, cfg, visit))
    return prob, iterates, a, b


@pytest.mark.parametrize("T, stride, used", [(6, 1, [1, 2, 3, 4, 5, 6]), (7, 3, [3, 6, 7]), (4, 4, [4]), (3, 10, [3])])
def test_trajectory_is_the_mean_harmful_gradient_over_the_sgd_iterates(T, stride, used):
    eta = 0.3
    prob, iterates, a, b = _sgd_trajectory_problem(T, eta)
    expected = sum(a @ iterates[t] + b for t in used) / len(used)
    res = solve("trajectory", prob, stride=stride)
    assert torch.allclose(res.hypergrad["w"], expected, atol=1e-10)
    assert res.diagnostics["iterates"] == used
    assert res.diagnostics["replay_gap"] < 1e-12  # the replay ended where the first run did
    if used == [T]:  # stride >= T: the first-order estimate g
        assert torch.allclose(res.hypergrad["w"], prob.grad_harm["w"], atol=0)


def test_trajectory_needs_the_replay():
    prob = problem(spd(torch.ones(D)), vec())
    with pytest.raises(SolverError, match="replay"):
        solve("trajectory", prob)
