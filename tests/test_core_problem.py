"""The hypergradient problem of one sampled configuration, on a tiny UNet in float64."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny import random_batch, tiny_context

from resalign.components import FinetuneConfig
from resalign import seeds
from resalign.core import tree
from resalign.core.problem import SimulationData, build_hypergrad_problem, simulate
from resalign.registry import get_registry


def _setup(adapter="full", optimizer="sgd", lr=0.05, steps=3, loss="denoise"):
    reg = get_registry()
    ctx = tiny_context(dtype=torch.float64)
    data = SimulationData(ft=random_batch(4, seed=1, dtype=torch.float64, prior=True),
                          harm=random_batch(2, seed=2, dtype=torch.float64))
    cfg = FinetuneConfig(adapter=adapter, lr=lr, steps=steps, optimizer=optimizer, finetune_loss=loss, batch_size=2)
    kw = dict(adapter=reg.create("adapter", adapter), finetune_loss=reg.create("finetune-loss", loss),
              harmful_loss=reg.create("harmful-loss", "ga"), seed=7)
    return ctx, data, cfg, kw


@pytest.mark.parametrize("adapter, optimizer, lr, eps", [("full", "sgd", 0.05, 1e-5), ("lora", "adamw", 1e-2, 1e-7)])
def test_unrolled_hypergradient_matches_finite_differences_through_adapt(adapter, optimizer, lr, eps):
    """d/dε L_harm(θ_FT(θ + εv)) by central differences equals ⟨unrolled hypergradient, v⟩.

    (Full fine-tuning is checked with SGD: Adam's update g/(|g| + ε) is ill-conditioned for the
    biases in front of GroupNorm, whose gradients are zero up to rounding.)"""
    ctx, data, cfg, kw = _setup(adapter=adapter, optimizer=optimizer, lr=lr, loss="prior_preservation")
    theta = tree.detach(ctx.theta0)
    problem, _ = build_hypergrad_problem(ctx, theta, cfg, data, **kw)
    hyper = get_registry().create("solver", "unrolled").solve(problem).hypergrad
    g = torch.Generator().manual_seed(4)
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in theta.items()}
    v = tree.scale(v, 1.0 / tree.norm(v))

    def harm_ft(eps):
        _, info = build_hypergrad_problem(ctx, tree.add(theta, v, eps), cfg, data, **kw)
        return info["harm_ft"]

    fd = (harm_ft(eps) - harm_ft(-eps)) / (2 * eps)
    assert abs(float(tree.dot(hyper, v)) - fd) < 1e-4 * max(abs(fd), 1e-3)


def test_problem_pieces_are_consistent():
    ctx, data, cfg, kw = _setup(steps=2)
    theta = tree.detach(ctx.theta0)
    problem, info = build_hypergrad_problem(ctx, theta, cfg, data, gamma=0.5, **kw)
    assert problem.gamma == 0.5 and info["delta_norm"] > 0
    # g is the gradient of harm_loss at θ_FT
    p = tree.leaves(problem.theta_ft)
    g = torch.autograd.grad(problem.harm_loss(p), list(p.values()), allow_unused=True)
    assert tree.norm(tree.add(problem.grad_harm, tree.grads_or_zeros(g, p), -1.0)) < 1e-12
    # unroll() reproduces θ_FT exactly (same batches, noise and seeds)
    assert tree.norm(tree.add(tree.detach(problem.unroll()), problem.theta_ft, -1.0)) < 1e-12
    # Richardson with ω = γ and K = 2 is g − γ H g
    x = get_registry().create("solver", "richardson", {"K": 2, "omega": 0.5, "safeguards": False, "x0": "zero"}).solve(problem)
    expected = tree.add(problem.grad_harm, problem.hvp_ft(problem.grad_harm), -0.5)
    assert tree.norm(tree.add(x.hypergrad, expected, -1.0)) < 1e-9 * tree.norm(expected)


def test_simulate_is_a_pure_function_of_its_seed():
    ctx, data, cfg, kw = _setup(adapter="lora", optimizer="adam", lr=1e-2)
    theta = tree.detach(ctx.theta0)
    # two solvers in the same state (Richardson's warm-start vector is an input too)
    solvers = [get_registry().create("solver", "richardson", {"K": 3, "power_iters": 2}) for _ in range(2)]
    h1, d1 = simulate(ctx, theta, cfg, data, solver=solvers[0], **kw)
    h2, d2 = simulate(ctx, theta, cfg, data, solver=solvers[1], **kw)
    assert tree.norm(tree.add(h1, h2, -1.0)) == 0.0
    assert d1["x_norms"] == d2["x_norms"] and "lambda_max" in d1


def test_curvature_samples_take_the_curvature_of_l_ft_on_the_first_pairs_only():
    """curvature_samples = 2 of 4: the products are those of the Hessian of L_FT on pairs 0 and 1 (fixed noise),
    recomputed here with an HVP of its own; θ_FT and g do not change."""
    from resalign.core.hvp import make_hvp
    from resalign.core.problem import _take

    ctx, data, cfg, kw = _setup(steps=2)
    theta = tree.detach(ctx.theta0)
    full, _ = build_hypergrad_problem(ctx, theta, cfg, data, **kw)
    part, _ = build_hypergrad_problem(ctx, theta, cfg, data, curvature_samples=2, **kw)
    assert tree.norm(tree.add(part.theta_ft, full.theta_ft, -1.0)) == 0.0
    assert tree.norm(tree.add(part.grad_harm, full.grad_harm, -1.0)) == 0.0
    pairs = _take(data.ft, torch.arange(2))
    loss = kw["finetune_loss"]
    reference = make_hvp(lambda p: loss(ctx, p, pairs, seeds.generator(kw["seed"], "hvp-noise")), part.theta_ft)
    v = part.grad_harm
    hv = part.hvp_ft(v)
    assert tree.norm(tree.add(hv, reference(v), -1.0)) < 1e-10 * tree.norm(hv)
    assert tree.norm(tree.add(hv, full.hvp_ft(v), -1.0)) > 1e-3 * tree.norm(hv)  # the other pairs mattered


@pytest.mark.parametrize("adapter, optimizer, lr", [("full", "sgd", 0.05), ("lora", "adam", 1e-2)])
def test_replay_visits_the_iterates_of_the_first_run_and_trajectory_averages_their_gradients(adapter, optimizer, lr):
    """θ_t of the replay equals ADAPT run for t steps (a prefix of the same fine-tuning), θ_T equals θ_FT,
    and the ``trajectory`` solver is the mean of ∇L_harm over θ_1..θ_T."""
    from resalign.core.problem import FinetuneObjective

    T = 3
    ctx, data, cfg, kw = _setup(adapter=adapter, optimizer=optimizer, lr=lr, steps=T)
    theta = tree.detach(ctx.theta0)
    problem, _ = build_hypergrad_problem(ctx, theta, cfg, data, **kw)
    seen = {}
    theta_T = problem.replay(lambda t, p: seen.setdefault(t, tree.detach({k: v.clone() for k, v in p.items()})))
    assert sorted(seen) == list(range(T)) and tree.norm(tree.add(theta_T, problem.theta_ft, -1.0)) == 0.0

    def prefix(t):  # the fine-tuning stopped after t steps, run from scratch
        objective = FinetuneObjective(ctx, kw["finetune_loss"], data.ft, cfg.batch_size, kw["seed"])
        short = FinetuneConfig(**{**cfg.__dict__, "steps": t})
        return kw["adapter"].adapt(tree.leaves(theta), objective, short,
                                   generator=seeds.generator(kw["seed"], "adapt-init")).theta_ft

    grads = []
    for t in range(1, T + 1):
        p_t = tree.detach(prefix(t))
        if t < T:
            assert tree.norm(tree.add(seen[t], p_t, -1.0)) < 1e-12
        at = tree.leaves(p_t)
        g = torch.autograd.grad(problem.harm_loss(at), list(at.values()), allow_unused=True)
        grads.append(tree.grads_or_zeros(g, at))
    expected = tree.scale(grads[0], 0.0)
    for g in grads:
        expected = tree.add(expected, g, 1.0 / T)
    h, info = simulate(ctx, theta, cfg, data, solver=get_registry().create("solver", "trajectory"), **kw)
    assert info["iterates"] == [1, 2, 3]
    assert tree.norm(tree.add(h, expected, -1.0)) < 1e-10 * tree.norm(expected)
