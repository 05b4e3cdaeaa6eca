"""ADAPT methods: functional optimizers vs torch.optim, LoRA vs peft, SVDiff, CustomDiffusion, full."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures.tiny import random_batch, tiny_context

from resalign.adapters._optim import make_optimizer
from resalign.components import FinetuneConfig
from resalign.losses._common import denoising_loss
from resalign.registry import get_registry


def create(name, **options):
    return get_registry().create("adapter", name, options)


@pytest.mark.parametrize("name, ref", [
    ("sgd", lambda p, lr: torch.optim.SGD(p, lr=lr)),
    ("adam", lambda p, lr: torch.optim.Adam(p, lr=lr)),
    ("adamw", lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=1e-2)),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_functional_optimizers_match_torch_optim(name, ref, inplace):
    """``step`` (out of place, differentiable) and ``step_`` (in place) both follow torch.optim."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    w0 = torch.randn(6, generator=g, dtype=torch.float64)

    def loss(w):
        return ((a @ w).sin() ** 2).sum() + (w**4).sum()

    w_ref = w0.clone().requires_grad_(True)
    opt = ref([w_ref], 0.05)
    params, opt_f = {"w": w0.clone()}, make_optimizer(name, 0.05)
    state = opt_f.init(params)
    for _ in range(6):
        opt.zero_grad()
        loss(w_ref).backward()
        opt.step()
        leaf = params["w"].clone().requires_grad_(True)
        grad = torch.autograd.grad(loss(leaf), leaf)[0]
        if inplace:
            before = params["w"]
            state = opt_f.step_(params, {"w": grad}, state)
            assert params["w"] is before
        else:
            params, state = opt_f.step(params, {"w": grad}, state)
    assert torch.allclose(params["w"], w_ref.detach(), atol=1e-12)


@pytest.mark.parametrize("chunk", [1 << 22, 16])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_in_place_takes_the_same_steps_bit_for_bit(name, chunk, monkeypatch):
    """``step_`` (the non-differentiable ADAPT: in place, on torch._foreach kernels, chunk by chunk)
    gives exactly the values of the differentiable ``step``, moments included."""
    from resalign.adapters import _optim

    monkeypatch.setattr(_optim, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    opt = make_optimizer(name, 1e-2)
    p = {"a": torch.randn(5, 3, generator=g), "b": torch.zeros(4), "c": torch.randn(6, generator=g)}
    assert _optim._chunks(list(p), p) == ([["a", "b", "c"]] if chunk > 25 else [["a"], ["b", "c"]])
    with_graph = (dict(p), opt.init(p))
    in_place = {k: v.clone() for k, v in p.items()}
    state = opt.init(in_place)
    for i in range(5):
        grads = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g) * (i % 2),
                 "c": torch.randn(6, generator=g)}
        with_graph = opt.step(*with_graph[:1], grads, with_graph[1])
        state = opt.step_(in_place, grads, state)
    for k in p:
        assert torch.equal(with_graph[0][k], in_place[k]) and torch.equal(with_graph[1]["v"][k], state["v"][k])
    assert not torch.equal(with_graph[0]["a"], p["a"])


def _objective(ctx, batches):
    it = iter(range(10**6))

    def loss(p):
        i = next(it)
        return denoising_loss(ctx, p, batches[i % len(batches)], torch.Generator().manual_seed(i))

    return loss


def test_full_adapt_equals_torch_training_of_a_module_copy():
    ctx = tiny_context()
    batches = [random_batch(2, seed=s) for s in range(3)]
    # SGD: Adam would amplify float noise in the (theoretically zero) gradients of biases before GroupNorm
    cfg = FinetuneConfig(adapter="full", lr=0.05, steps=4, optimizer="sgd")
    out = create("full").adapt(ctx.theta0, _objective(ctx, batches), cfg)

    unet = copy.deepcopy(ctx.model.unet).requires_grad_(True)
    opt = torch.optim.SGD(unet.parameters(), lr=0.05)
    for i in range(4):
        b = batches[i % 3]
        g = torch.Generator().manual_seed(i)
        noise, t = ctx.schedule.sample(b.x0, g)
        pred = unet(ctx.schedule.add_noise(b.x0, noise, t), t, encoder_hidden_states=b.cond).sample
        opt.zero_grad()
        ((pred - noise) ** 2).mean().backward()
        opt.step()
    for k, v in unet.named_parameters():
        assert torch.allclose(out.theta_ft[k], v.detach(), atol=1e-5), k
    assert len(out.losses) == 4
    assert not any(v.requires_grad for v in out.theta_ft.values())


def test_lora_targets_and_merged_delta_match_peft():
    from peft import LoraConfig

    ctx = tiny_context()
    adapter = create("lora", rank=2, alpha=3.0)
    theta = ctx.theta0
    phi = adapter.init(theta, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    phi = {k: (torch.randn(v.shape, generator=g) * 0.1 if k.endswith("lora_B") else v) for k, v in phi.items()}

    peft_unet = copy.deepcopy(ctx.model.unet)
    peft_unet.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=True))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_unet.named_parameters() if ".lora_A." in n}
    assert {k[: -len(".weight.lora_A")] for k in phi if k.endswith(".lora_A")} == wrapped
    sd = {}
    for k, v in phi.items():
        module = k.rsplit(".weight.", 1)[0]
        sd[f"{module}.{'lora_A' if k.endswith('lora_A') else 'lora_B'}.default_0.weight"] = v
    state = peft_unet.state_dict()
    missing = [k for k in sd if k not in state]
    if missing:  # adapter name differs between peft versions
        sd = {k.replace(".default_0.", ".default."): v for k, v in sd.items()}
    peft_unet.load_state_dict(sd, strict=False)

    b = random_batch(2)
    t = torch.tensor([3, 700])
    merged = adapter.merge(theta, phi)
    ours = ctx.model(merged, b.x0, t, b.cond)
    theirs = peft_unet(b.x0, t, encoder_hidden_states=b.cond).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    for name, module in peft_unet.named_modules():
        if hasattr(module, "get_delta_weight") and name in wrapped:
            key = name + ".weight"
            adapter_name = next(iter(module.lora_A))
            assert torch.allclose(merged[key] - theta[key], module.get_delta_weight(adapter_name), atol=1e-6)


def test_lora_init_follows_peft_and_adapt_changes_only_targets():
    ctx = tiny_context()
    adapter = create("lora", rank=4)
    phi = adapter.init(ctx.theta0, torch.Generator().manual_seed(0))
    for k, v in phi.items():
        if k.endswith("lora_B"):
            assert torch.count_nonzero(v) == 0
        else:
            fan_in = v.shape[1]
            assert v.abs().max() <= 1 / fan_in**0.5
    cfg = FinetuneConfig(adapter="lora", lr=1e-2, steps=3, optimizer="adam")
    out = adapter.adapt(ctx.theta0, _objective(ctx, [random_batch(2)]), cfg, generator=torch.Generator().manual_seed(0))
    changed = {k for k in ctx.theta0 if not torch.equal(out.theta_ft[k], ctx.theta0[k])}
    assert changed and changed <= set(adapter.targets(ctx.theta0))
    for k in changed:  # rank ≤ r deltas
        assert torch.linalg.matrix_rank(out.theta_ft[k] - ctx.theta0[k]) <= 4


def test_svdiff_reparameterizes_singular_values():
    ctx = tiny_context()
    adapter = create("svdiff", include=[r"mid_block\..*attn2\.to_q\.weight"])
    theta = ctx.theta0
    phi = adapter.init(theta, None)
    merged = adapter.merge(theta, phi)
    for k in theta:
        assert torch.allclose(merged[k], theta[k], atol=1e-6)
    (key,) = adapter.targets(theta)
    delta = torch.linspace(-0.5, 0.5, phi[key + ".delta"].numel())
    merged = adapter.merge(theta, {key + ".delta": delta})
    u, s, vh = torch.linalg.svd(theta[key].double(), full_matrices=False)
    expected = u @ torch.diag(torch.relu(s + delta.double())) @ vh
    assert torch.allclose(merged[key].double(), expected, atol=1e-5)
    cfg = FinetuneConfig(adapter="svdiff", lr=1e-2, steps=3, optimizer="adam")
    out = adapter.adapt(theta, _objective(ctx, [random_batch(2)]), cfg)
    assert {k for k in theta if not torch.equal(out.theta_ft[k], theta[k])} == {key}


def test_custom_diffusion_trains_only_cross_attention_keys_and_values():
    ctx = tiny_context()
    cfg = FinetuneConfig(adapter="custom_diffusion", lr=1e-2, steps=2, optimizer="sgd")
    out = create("custom_diffusion").adapt(ctx.theta0, _objective(ctx, [random_batch(2)]), cfg)
    changed = {k for k in ctx.theta0 if not torch.equal(out.theta_ft[k], ctx.theta0[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)


@pytest.mark.parametrize("name", ["full", "lora", "svdiff", "custom_diffusion"])
def test_differentiable_adapt_keeps_the_graph_to_theta(name):
    ctx = tiny_context()
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in ctx.theta0.items()}
    cfg = FinetuneConfig(adapter=name, lr=1e-2, steps=2, optimizer="adam")
    out = create(name).adapt(theta, _objective(ctx, [random_batch(2)]), cfg, differentiable=True,
                             generator=torch.Generator().manual_seed(0))
    key = next(k for k in theta if ".attn2.to_k." in k)
    grad = torch.autograd.grad(out.theta_ft[key].sum(), theta[key])[0]
    assert grad is not None and torch.isfinite(grad).all()


def test_unknown_optimizer_and_option_are_config_errors():
    from resalign.errors import ConfigError

    ctx = tiny_context()
    with pytest.raises(ConfigError, match="optimizer"):
        create("full").adapt(ctx.theta0, lambda p: torch.zeros(()), FinetuneConfig(optimizer="lion"))
    with pytest.raises(ConfigError, match="rnk"):
        create("lora", rnk=3)
