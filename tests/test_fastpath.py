"""The fast inner loop (resalign.fastpath) against the reference loop and plain torch training."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures.tiny import random_batch, tiny_context

from resalign import fastpath
from resalign.adapters._optim import make_optimizer
from resalign.components import FinetuneConfig
from resalign.core import tree
from resalign.core.functional import ParameterSlots
from resalign.core.problem import SimulationData, simulate
from resalign.errors import ConfigError
from resalign.registry import get_registry


@pytest.fixture
def path():
    """Select a path for the test; the process's path is restored afterwards."""
    before = fastpath.current()
    yield fastpath.use
    fastpath.use(before)


def rel(a: dict, b: dict) -> float:
    return tree.norm(tree.add(a, b, -1.0)) / tree.norm(b)


def test_the_path_is_chosen_by_name():
    assert fastpath.PATHS[0] == "fast"  # the default; the compiled path builds on it (tests/test_compiled.py)
    with pytest.raises(ConfigError, match="inner loop 'quick'"):
        fastpath.use("quick")


@pytest.mark.parametrize("name, ref", [
    ("adam", lambda p, lr: torch.optim.Adam(p, lr=lr, foreach=False)),
    ("adamw", lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=1e-2, foreach=False)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adam_takes_the_steps_of_torch_optim(name, ref, dtype):
    """``fused_step_`` (torch's fused kernel) follows the plain torch.optim loop and the op-by-op
    ``step_`` to float rounding, over steps where some gradients are zero."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,), (7, 2, 2)]
    p0 = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) * (i % 3 > 0) for s in shapes] for i in range(8)]
    ref_p = [p.clone().requires_grad_(True) for p in p0]
    opt_ref = ref(ref_p, 1e-2)
    opt = make_optimizer(name, 1e-2)
    fused = [p.clone() for p in p0]
    state = opt.fused_init(fused)
    by_op = {str(i): p.clone() for i, p in enumerate(p0)}
    op_state = opt.init(by_op)
    for gs in grads:
        for p, gr in zip(ref_p, gs):
            p.grad = gr.clone()
        opt_ref.step()
        opt.fused_step_(fused, gs, state)
        op_state = opt.step_(by_op, {str(i): gr for i, gr in enumerate(gs)}, op_state)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for i, p in enumerate(fused):
        assert torch.allclose(p, ref_p[i].detach(), rtol=tol, atol=0), i
        assert torch.allclose(p, by_op[str(i)], rtol=tol, atol=0), i
    assert state["t"] == op_state["t"] == 8


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 1e-2)])
def test_foreach_sgd_takes_exactly_the_steps_of_step_(momentum, wd):
    from resalign.adapters._optim import SGD

    g = torch.Generator().manual_seed(1)
    opt = SGD(0.1, momentum=momentum, weight_decay=wd)
    p = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    by_op, fused = {k: v.clone() for k, v in p.items()}, [v.clone() for v in p.values()]
    s1, s2 = opt.init(by_op), opt.fused_init(fused)
    for _ in range(4):
        gs = {k: torch.randn(v.shape, generator=g) for k, v in p.items()}
        s1 = opt.step_(by_op, gs, s1)
        opt.fused_step_(fused, list(gs.values()), s2)
    assert all(torch.equal(a, b) for a, b in zip(by_op.values(), fused))


def _objective(ctx, batches):
    it = iter(range(10**6))

    def loss(p):
        i = next(it)
        return get_registry().create("finetune-loss", "denoise", {})(
            ctx, p, batches[i % len(batches)], torch.Generator().manual_seed(i))

    return loss


def test_fast_adapt_equals_torch_adam_training_of_a_module_copy(path):
    """The straightforward reference: the UNet module trained by torch.optim.Adam on the same batches
    and noise (float64, where Adam's g/(|g| + ε) does not amplify rounding noise)."""
    path("fast")
    ctx = tiny_context(dtype=torch.float64)
    batches = [random_batch(2, seed=s, dtype=torch.float64) for s in range(3)]
    cfg = FinetuneConfig(adapter="full", lr=1e-3, steps=5, optimizer="adam")
    out = get_registry().create("adapter", "full", {}).adapt(ctx.theta0, _objective(ctx, batches), cfg)

    unet = copy.deepcopy(ctx.model.unet).requires_grad_(True)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    losses = []
    for i in range(5):
        b = batches[i % 3]
        noise, t = ctx.schedule.sample(b.x0, torch.Generator().manual_seed(i))
        pred = unet(ctx.schedule.add_noise(b.x0, noise, t), t, encoder_hidden_states=b.cond).sample
        opt.zero_grad()
        loss = ((pred - noise) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    module = {k: v.detach() for k, v in unet.named_parameters()}
    assert rel(out.theta_ft, module) < 1e-6
    assert out.losses == pytest.approx(losses, rel=1e-6)
    assert not any(v.requires_grad for v in out.theta_ft.values())


@pytest.mark.parametrize("adapter, optimizer, loss", [("full", "adam", "denoise"), ("full", "sgd", "prior_preservation"),
                                                      ("lora", "adamw", "prior_preservation")])
def test_fast_simulation_equals_the_reference_one(path, adapter, optimizer, loss):
    """A whole simulation (θ_FT, L_harm(θ_FT), the hypergradient) on both paths, same seed: equal to
    1e-6 relative in float64. (In float32 the fused kernel's rounding and the batched prior pairs
    move θ_FT by about 1e-7 relative, which the solver's λ_max estimate turns into ~1e-2 on the
    hypergradient, as the same relative perturbation of θ does on the reference path: docs/performance.md.)"""
    reg = get_registry()
    ctx = tiny_context(dtype=torch.float64)
    data = SimulationData(ft=random_batch(4, seed=1, dtype=torch.float64, prior=True),
                          harm=random_batch(2, seed=2, dtype=torch.float64))
    cfg = FinetuneConfig(adapter=adapter, lr=1e-2 if optimizer != "sgd" else 0.05, steps=4, optimizer=optimizer,
                         finetune_loss=loss, batch_size=2)
    theta = tree.detach(ctx.theta0)
    out = {}
    for name in ("reference", "fast"):
        path(name)
        out[name] = simulate(ctx, theta, cfg, data, adapter=reg.create("adapter", adapter, {}),
                             finetune_loss=reg.create("finetune-loss", loss, {}),
                             harmful_loss=reg.create("harmful-loss", "ga", {}), seed=3,
                             solver=reg.create("solver", "richardson", {"K": 3}), curvature="gauss-newton")
    (h0, d0), (h1, d1) = out["reference"], out["fast"]
    assert rel(h1, h0) < 1e-6
    assert d1["harm_ft"] == pytest.approx(d0["harm_ft"], rel=1e-9)
    assert d1["delta_norm"] == pytest.approx(d0["delta_norm"], rel=1e-9)


def test_slot_swapping_calls_the_module_at_the_given_parameters_and_restores_it(path):
    from torch.func import functional_call

    ctx = tiny_context()
    unet = ctx.model.unet
    own = {k: v for k, v in unet.named_parameters()}
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in own.items() if ".attn2." in k or "conv_in" in k}
    x, t, c = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 4, 16, generator=g)
    path("fast")
    fast = ctx.model(params, x, t, c)
    path("reference")
    reference = ctx.model(params, x, t, c)
    assert torch.equal(fast, reference)
    expected = functional_call(unet, params, (x, t), {"encoder_hidden_states": c, "return_dict": False}, strict=False)[0]
    assert torch.equal(fast, expected)
    assert all(v is own[k] for k, v in unet.named_parameters())
    slots = ParameterSlots(unet)
    with pytest.raises(RuntimeError, match="inside"):
        with slots.swapped(params):
            raise RuntimeError("inside")
    assert all(v is own[k] for k, v in unet.named_parameters())
    assert not slots.covers({"no.such.weight": torch.zeros(1)})


def test_a_module_with_tied_weights_keeps_functional_call():
    lin = torch.nn.Linear(3, 3)
    tied = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    assert not ParameterSlots(tied).usable
    assert ParameterSlots(torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False))).usable


def test_prior_preservation_in_one_call_equals_two_calls(path):
    ctx = tiny_context()
    batch = random_batch(2, seed=4, prior=True)
    loss = get_registry().create("finetune-loss", "prior_preservation", {"prior_weight": 0.5})
    params = tree.leaves(ctx.theta0)
    values, grads, after = {}, {}, {}
    for name in ("reference", "fast"):
        path(name)
        gen = torch.Generator().manual_seed(9)
        values[name] = loss(ctx, params, batch, gen)
        grads[name] = tree.grads_or_zeros(torch.autograd.grad(values[name], list(params.values()), allow_unused=True),
                                          params)
        after[name] = torch.randn(3, generator=gen)  # both consumed the generator alike
    assert float(values["fast"]) == pytest.approx(float(values["reference"]), rel=1e-6)
    assert rel(grads["fast"], grads["reference"]) < 1e-6
    assert torch.equal(after["fast"], after["reference"])
