"""Alg. 2: the configuration pool, θ parameterizations, the outer gradient and repeatable steps."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny import COND_DIM, TOKENS, tiny_context

from resalign import seeds

from resalign.core import tree
from resalign.core.meta import ConfigPool, MethodSettings, PairSet, ResAlign, TrainingData
from resalign.core.params import Parameterization, ParamsOptions
from resalign.core.problem import simulate
from resalign.errors import ConfigError
from resalign.registry import get_registry


def test_paper_pool_and_exclusion_rule():
    pool = ConfigPool()  # Sec. 4.1: lr {1e-4, 1e-5, 1e-6} x steps {5, 10, 20, 30}, SGD/Adam, 2 losses, 2 adapters
    configs = pool.configs()
    assert len(configs) == (3 * 4 - 2) * 2 * 2 * 2  # lr 1e-4 with 20 and 30 steps excluded
    assert not any(c.lr == 1e-4 and c.steps >= 20 for c in configs)
    assert len(ConfigPool(max_lr_steps=0).configs()) == 3 * 4 * 8
    pool = ConfigPool(lrs_by_optimizer={"sgd": [0.1]}, adapters=["lora"], max_lr_steps=0)
    assert {c.lr for c in pool.configs() if c.optimizer == "sgd"} == {0.1}
    assert all(c.adapter == "lora" for c in pool.configs())
    a = [pool.sample(seeds.rng(3, i)).label() for i in range(20)]
    assert a == [pool.sample(seeds.rng(3, i)).label() for i in range(20)] and len(set(a)) > 3
    with pytest.raises(ConfigError):
        ConfigPool(lrs=[1.0], max_lr_steps=1e-3).configs()


def test_parameterizations_map_theta_to_unet_weights():
    ctx = tiny_context()
    base = ctx.theta0
    full = Parameterization("full", base)
    assert set(full.init()) == set(base)
    x = Parameterization("xattn", base)
    theta = x.init()
    assert theta and all(".attn2." in k for k in theta)
    assert set(x.weights(theta)) == set(base)
    lora = Parameterization("lora", base, ParamsOptions(rank=2, alpha=4.0))
    theta = {k: v.requires_grad_(True) for k, v in lora.init().items()}
    w = lora.weights(theta)
    key = next(k for k in lora.names if ".attn1.to_q." in k)
    a, b = theta[key + ".lora_A"], theta[key + ".lora_B"]
    assert torch.allclose(w[key], base[key] + 2.0 * b @ a)
    # the pull-back (∂W/∂θ)ᵀ h for LoRA: ∂/∂B = s·h·Aᵀ, ∂/∂A = s·Bᵀ·h
    h = torch.randn(w[key].shape, generator=torch.Generator().manual_seed(0))
    ga, gb = torch.autograd.grad((w[key] * h).sum(), [a, b])
    assert torch.allclose(gb, 2.0 * h @ a.detach().T, atol=1e-6)
    assert torch.allclose(ga, 2.0 * b.detach().T @ h, atol=1e-6)
    with pytest.raises(ConfigError):
        Parameterization("everything", base)


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def pairs():
        return PairSet(x0=torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, cond=torch.randn(n, TOKENS, COND_DIM, generator=g),
                       prompts=[f"p{i}" for i in range(n)])

    return TrainingData(harmful=pairs(), preserve=pairs(), finetune=pairs())


def _trainer(ctx, *, beta=0.5, solver="richardson", params="full", J=2, seed=0, registry=None, settings=None, **pool):
    reg = registry or get_registry()
    pool = ConfigPool(**{"lrs": [1e-3], "steps": [2], "optimizers": ["sgd", "adam"], "adapters": ["full", "lora"],
                         "batch_size": 2, "max_lr_steps": 0, **pool})
    settings = MethodSettings(beta=beta, alpha=0.7, J=J, outer_lr=1e-3, harm_batch=2, preserve_batch=2, ft_size=2,
                              seed=seed, **(settings or {}))
    return ResAlign(ctx, Parameterization(params, ctx.theta0, seed=seed),
                    harmful_loss=reg.create("harmful-loss", "ga"), regularizer=reg.create("regularizer", "distill"),
                    solver=reg.create("solver", solver, {"K": 2, "power_iters": 2} if solver == "richardson" else {}),
                    pool=pool, data=_data(), settings=settings, registry=reg)


def test_outer_gradient_is_eq_4_with_the_mean_hypergradient():
    """G = (1 − β)∇L_harm(θ) + α∇R(θ) + (β/J) Σ_j h_j, against a reference built without the core: each
    θ_FT,j by torch.optim.SGD on a copy of the UNet module, h_j = ∇L_harm(θ_FT,j) (first-order solver),
    only the random draws (the run's seed tags) shared with the code under test."""
    import copy

    ctx = tiny_context()
    lr, T = 1e-2, 2
    tr = _trainer(ctx, beta=0.6, solver="first-order", J=2, lrs=[lr], steps=[T], optimizers=["sgd"], adapters=["full"],
                  finetune_losses=["denoise"])
    grads, metrics = tr.gradient()
    s = tr.settings
    theta = tree.leaves(tr.theta)
    harm = tr.data.harmful.sample(s.harm_batch, seeds.generator(s.seed, 0, "harm-data"))
    pres = tr.data.preserve.sample(s.preserve_batch, seeds.generator(s.seed, 0, "preserve-data"))
    lh = tr.harmful_loss(ctx, theta, harm, seeds.generator(s.seed, 0, "harm-noise"))
    lr_ = tr.regularizer(ctx, theta, pres, seeds.generator(s.seed, 0, "reg-noise"))
    g_plain = torch.autograd.grad((1 - s.beta) * lh + s.alpha * lr_, list(theta.values()), allow_unused=True)
    expected = {k: (g if g is not None else torch.zeros_like(theta[k])) for k, g in zip(theta, g_plain)}
    for j in range(s.J):
        sim = seeds.derive(s.seed, 0, j, "simulation")
        ft = tr.data.finetune.sample(s.ft_size, seeds.generator(s.seed, 0, j, "ft-data"))
        unet = copy.deepcopy(ctx.model.unet).requires_grad_(True)
        opt = torch.optim.SGD(unet.parameters(), lr=lr)
        for step in range(T):
            idx = (torch.arange(2) + 2 * step) % ft.x0.shape[0]  # batch_size 2, in order
            noise, t = ctx.schedule.sample(ft.x0[idx], seeds.generator(sim, "ft-noise", step))
            pred = unet(ctx.schedule.add_noise(ft.x0[idx], noise, t), t, encoder_hidden_states=ft.cond[idx]).sample
            opt.zero_grad()
            ((pred - noise) ** 2).mean().backward()
            opt.step()
        at_ft = {k: v.detach().clone().requires_grad_(True) for k, v in unet.named_parameters()}
        h = torch.autograd.grad(tr.harmful_loss(ctx, at_ft, harm, seeds.generator(sim, "harm-noise")),
                                list(at_ft.values()), allow_unused=True)
        for (k, v), g in zip(at_ft.items(), h):
            if g is not None:
                expected[k] = expected[k] + s.beta / s.J * g
    diff = sum(float((grads[k] - expected[k]).double().pow(2).sum()) for k in expected) ** 0.5
    assert metrics["dropped"] == 0 and len(metrics["simulations"]) == 2
    assert diff < 1e-4 * tree.norm(expected), (diff, tree.norm(expected))
    assert metrics["hypergrad_norm"] > 0


def test_beta_zero_is_plain_unlearning_without_simulations():
    tr = _trainer(tiny_context(), beta=0.0)
    m = tr.outer_step()
    assert "simulations" not in m and m["step"] == 1


@pytest.mark.parametrize("params", ["full", "lora"])
def test_outer_steps_are_repeatable_and_resume_exactly(params):
    a = _trainer(tiny_context(), params=params)
    for _ in range(2):
        a.outer_step()
    b = _trainer(tiny_context(), params=params)
    b.outer_step()
    state = b.state_dict()
    c = _trainer(tiny_context(), params=params)
    c.load_state_dict(state)
    c.outer_step()
    assert c.step == 2
    for k in a.theta:
        assert torch.equal(a.theta[k], c.theta[k]), k
    w = a.unlearned_weights()
    assert set(w) == set(a.ctx.theta0) and not any(v.requires_grad for v in w.values())


def test_outlier_rule_uses_the_median_of_the_step_with_the_unadapted_loss():
    from resalign.core.health import outlier_mask

    assert outlier_mask(0.011, [0.01, 0.012, 1573.0], 10) == [False, False, True]
    # J = 2: the no-fine-tuning value keeps the median meaningful, so one blow-up is still caught
    assert outlier_mask(0.008, [0.01, 5.0], 10) == [False, True]
    assert outlier_mask(0.008, [0.01, 0.079], 10) == [False, False]
    assert outlier_mask(-0.2, [-0.25, -30.0], 10) == [False, True]  # GA's negative losses: magnitudes
    assert outlier_mask(0.008, [0.01, 5.0], 0) == [False, False]


def test_a_diverged_simulation_is_dropped_with_its_reason_and_never_averaged_in():
    ctx = tiny_context()
    tr = _trainer(ctx, beta=0.6, solver="first-order", J=2, lrs=[1e4], optimizers=["sgd"], adapters=["full"],
                  finetune_losses=["denoise"])
    grads, metrics = tr.gradient()
    assert metrics["dropped"] == 2 and "harm_ft_mean" not in metrics
    assert all("diverged" in s["dropped"] for s in metrics["simulations"])
    plain = _trainer(ctx, beta=0.6, solver="first-order", J=0)
    expected, _ = plain.gradient()  # (1 − β)∇L_harm + α∇R only
    for k in grads:
        torch.testing.assert_close(grads[k], expected[k])


def test_an_outlier_simulation_is_dropped_from_the_mean(monkeypatch):
    import resalign.core.meta as meta

    calls = []

    def inflated(*args, **kwargs):
        h, info = simulate(*args, **kwargs)
        calls.append(h)
        if len(calls) == 2:  # the second simulation of the step "blew up"
            info["harm_ft"] = 1e4 * abs(info["harm_ft"]) + 1.0
        return h, info

    monkeypatch.setattr(meta, "simulate", inflated)
    tr = _trainer(tiny_context(), beta=0.6, solver="first-order", J=2, settings={"outlier_factor": 10.0})
    grads, metrics = tr.gradient()
    assert metrics["dropped"] == 1 and metrics["simulations"][1]["dropped"].startswith("outlier")
    assert metrics["hypergrad_norm"] == pytest.approx(tree.norm(calls[0]), rel=1e-6)
    # by default a large rebound that did not diverge is kept: it is what Eq. 3 penalises
    calls.clear()
    tr = _trainer(tiny_context(), beta=0.6, solver="first-order", J=2)
    grads, metrics = tr.gradient()
    assert metrics["dropped"] == 0 and not any("dropped" in s for s in metrics["simulations"])
    mean = tree.scale(tree.add(calls[0], calls[1]), 0.5)
    assert metrics["hypergrad_norm"] == pytest.approx(tree.norm(mean), rel=1e-6)


def test_gamma_rule_reach_gives_each_simulation_gamma_times_its_steps_times_lr(monkeypatch):
    from resalign.components import FinetuneConfig
    import resalign.core.meta as meta

    c = FinetuneConfig(adapter="full", lr=1e-4, steps=30, optimizer="adam", finetune_loss="denoise")
    assert MethodSettings(gamma=0.5).proximity(c) == 0.5
    assert MethodSettings(gamma=0.5, gamma_rule="reach").proximity(c) == pytest.approx(0.5 * 30 * 1e-4)
    with pytest.raises(ConfigError, match="gamma_rule"):
        MethodSettings(gamma_rule="far").proximity(c)
    seen = []

    def spy(*args, **kwargs):
        seen.append((args[2], kwargs["gamma"]))
        return simulate(*args, **kwargs)

    monkeypatch.setattr(meta, "simulate", spy)
    tr = _trainer(tiny_context(), beta=0.6, solver="first-order", J=2)
    tr.settings.gamma_rule = "reach"
    tr.gradient()
    assert len(seen) == 2 and all(g == pytest.approx(cfg.steps * cfg.lr) for cfg, g in seen)


def test_prior_pairs_follow_what_the_loss_or_adapter_declares():
    """A third-party L_FT declaring ``needs_prior`` gets prior pairs; an undeclared one gets none, whatever
    its name; DreamBooth (the adapter) prescribes prior preservation."""
    from dataclasses import dataclass

    from resalign.hookspecs import hookimpl
    from resalign.losses._common import denoising_loss
    from resalign.registry import build_registry

    seen = []

    class WithPrior:
        name, needs_prior = "with-prior", True

        def __call__(self, ctx, params, batch, generator=None):
            seen.append(batch.prior is not None)
            return denoising_loss(ctx, params, batch, generator)

    @dataclass
    class Plugin:
        @hookimpl
        def register_finetune_losses(self, register):
            register("with-prior", WithPrior)
            register("prior_preservation_lookalike", type("Plain", (WithPrior,), {"needs_prior": False,
                                                                                  "name": "prior_preservation_lookalike"}))

    reg = build_registry(entry_points=False, extra_plugins=(Plugin(),))
    ctx = tiny_context()
    for loss, adapter, want in (("with-prior", "full", True), ("prior_preservation_lookalike", "full", False),
                                ("denoise", "dreambooth", True)):
        tr = _trainer(ctx, J=1, registry=reg, optimizers=["sgd"], adapters=[adapter], finetune_losses=[loss])
        (config,) = tr.pool.configs()
        data = tr.simulation_data(0, 0, config, tr.data.harmful.sample(2, seeds.generator(0, "h")))
        assert (data.ft.prior is not None) == want, (loss, adapter)
        if want:
            assert data.ft.prior.x0.shape == data.ft.x0.shape
    assert type(tr.finetune_loss(config)).__name__ == "PriorPreservation"
    seen.clear()
    _trainer(ctx, J=1, beta=0.5, solver="first-order", registry=reg, optimizers=["sgd"], adapters=["full"],
             finetune_losses=["with-prior"]).gradient()
    assert seen and all(seen)


def test_anchor_embeddings_follow_what_the_harmful_loss_declares(tiny_toy_dir, tmp_path):
    """``run`` builds CA-style anchor embeddings for any harmful loss declaring ``needs_anchor``, and for
    no other (the built-in ``ca`` included only through its declaration)."""
    from dataclasses import dataclass

    from resalign.config import from_dict
    from resalign.hookspecs import hookimpl
    from resalign.pipeline.prepare import prepare
    from resalign.registry import build_registry
    from resalign.settings.run import RunConfig, resolve

    class Anchored:
        name, needs_anchor = "anchored", True

        def __call__(self, ctx, params, batch, generator=None):
            return ((params["conv_in.weight"] - batch.anchor_cond.mean()) ** 2).sum()

    @dataclass
    class Plugin:
        @hookimpl
        def register_harmful_losses(self, register):
            register("anchored", Anchored)
            register("plain", type("Plain", (Anchored,), {"needs_anchor": False, "name": "plain"}))

    reg = build_registry(entry_points=False, extra_plugins=(Plugin(),))
    data = {"harmful": [{"source": "toy:harmful", "n": 2}], "preserve": [{"source": "toy:preservation", "n": 2}],
            "finetune": [{"source": "toy:preservation", "n": 2}], "gen_steps": 1, "concept": "ring", "anchor": "circle"}
    for loss, want in (("anchored", True), ("plain", False), ("ca", True), ("ga", False)):
        cfg = resolve(from_dict(RunConfig, {"model": str(tiny_toy_dir), "loss": loss, "data": data, "outer_steps": 1}))
        prep = prepare(cfg, tmp_path / "data", registry=reg)  # the pairs are generated once, then read back
        anchor = prep.data.harmful.anchor_cond
        assert (anchor is not None) == want, loss
        if want:  # the harmful prompts with the concept replaced by the anchor
            assert anchor.shape == prep.data.harmful.cond.shape and not torch.equal(anchor, prep.data.harmful.cond)


def test_host_held_outer_moments_and_eigenvectors_leave_the_steps_unchanged(monkeypatch):
    """offload_outer_state: between updates the outer AdamW moments, and always Richardson's warm-start
    eigenvector and the finished hypergradients, live in host memory (shared memory here, which a CPU
    measurement tells apart from the anonymous pages an accelerator would hold); θ after three outer
    steps is bitwise the θ of a run that keeps everything in one place."""
    from resalign.ops import HOST_MEMORY_ENV

    plain = _trainer(tiny_context(), beta=0.5, J=2)
    for _ in range(3):
        plain.outer_step()
    monkeypatch.setenv(HOST_MEMORY_ENV, "shared")
    held = _trainer(tiny_context(), beta=0.5, J=2, settings={"offload_outer_state": True})
    for _ in range(3):
        held.outer_step()
        moments = [t for st in held.optimizer.state.values() for k, t in st.items() if k != "step"]
        assert len(moments) == 2 * len(held.theta) and all(t.is_shared() for t in moments)
        assert not any(p.is_shared() for p in held.theta.values())
        assert held.solver.eigvecs and all(t.is_shared() for v in held.solver.eigvecs.values() for t in v.values())
    assert all(torch.equal(held.theta[k], plain.theta[k]) for k in plain.theta)
    assert all(torch.equal(plain.optimizer.state[p]["exp_avg"], held.optimizer.state[q]["exp_avg"])
               for p, q in zip(plain.theta.values(), held.theta.values()))
    # a checkpoint of the host-held state resumes to the same next step
    resumed = _trainer(tiny_context(), beta=0.5, J=2, settings={"offload_outer_state": True})
    resumed.load_state_dict(held.state_dict())
    assert all(t.is_shared() for st in resumed.optimizer.state.values() for k, t in st.items() if k != "step")
    plain.outer_step(), resumed.outer_step()
    assert all(torch.equal(resumed.theta[k], plain.theta[k]) for k in plain.theta)


@pytest.mark.parametrize("fixed", [False, True])
def test_fixed_noise_draws_the_harmful_timesteps_and_noise_once_for_the_run(fixed):
    """``fixed_noise``: L_harm(θ_i) and the simulations' L_harm(θ_FT) (common noise) see the same
    generator state at every outer step; without it, each step draws its own."""
    tr = _trainer(tiny_context(), beta=0.5, solver="first-order", J=1, steps=[1], optimizers=["sgd"],
                  adapters=["full"], finetune_losses=["denoise"],
                  settings={"common_noise": True, "fixed_noise": fixed})
    seen = []
    inner = tr.harmful_loss

    def recording(ctx, weights, batch, generator=None, *a, **k):
        seen.append(None if generator is None else generator.get_state().clone())
        return inner(ctx, weights, batch, generator, *a, **k)

    tr.harmful_loss = recording
    for _ in range(2):
        tr.outer_step()
    states = [s for s in seen if s is not None]
    per_step = len(states) // 2
    assert per_step >= 2  # L_harm(θ_i) and the simulation's L_harm(θ_FT)
    first, second = states[:per_step], states[per_step:]
    assert all(torch.equal(a, first[0]) for a in first)  # common noise within a step
    assert all(torch.equal(a, b) for a, b in zip(first, second)) == fixed
