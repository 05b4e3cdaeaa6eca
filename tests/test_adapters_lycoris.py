"""LoHa and LoKr: the same factor shapes, initial ΔW = 0 and ΔW(φ) as peft's LoHaConfig / LoKrConfig layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resalign.registry import get_registry

TARGETS = ["to_q", "conv", "proj"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 12)
        self.conv = nn.Conv2d(8, 6, 3)
        self.proj = nn.Conv2d(8, 6, 1)
        self.other = nn.Linear(12, 12)  # not targeted


def _peft_layers(name, options):
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    r, alpha = options["rank"], options["alpha"]
    if name == "loha":
        cfg = LoHaConfig(r=r, alpha=alpha, target_modules=TARGETS)
    else:
        cfg = LoKrConfig(r=r, alpha=alpha, target_modules=TARGETS, decompose_both=options.get("decompose_both", False))
    torch.manual_seed(0)
    block = Block()
    theta = {k: v.detach().clone() for k, v in block.named_parameters()}
    model = inject_adapter_in_model(cfg, block)
    return theta, {m: model.get_submodule(m) for m in TARGETS}


CASES = [
    ("loha", {"rank": 2, "alpha": 3.0}),
    ("loha", {"rank": 5, "alpha": 1.0}),
    ("lokr", {"rank": 2, "alpha": 3.0}),  # full W2 (rank >= half its size)
    ("lokr", {"rank": 1, "alpha": 2.0}),  # W2 = W2a W2b
    ("lokr", {"rank": 1, "alpha": 2.0, "decompose_both": True}),  # W1 = W1a W1b as well
]


@pytest.mark.parametrize("name, options", CASES)
def test_delta_equals_peft_layer(name, options):
    theta, layers = _peft_layers(name, options)
    adapter = get_registry().create("adapter", name, {**options, "targets": TARGETS})
    phi = adapter.init(theta, torch.Generator().manual_seed(1))
    merged0 = adapter.merge(theta, phi)
    g = torch.Generator().manual_seed(2)
    for mod, layer in layers.items():
        ours = {k.rsplit(".", 1)[1]: v for k, v in phi.items() if k.startswith(f"{mod}.weight.")}
        theirs = {f: getattr(layer, f)["default"] for f in adapter.factors if "default" in getattr(layer, f)}
        assert {f: tuple(v.shape) for f, v in ours.items()} == {f: tuple(v.shape) for f, v in theirs.items()}, mod
        # peft's initialisation also starts from ΔW = 0
        assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
        assert torch.equal(merged0[f"{mod}.weight"], theta[f"{mod}.weight"])
        with torch.no_grad():
            for f, v in ours.items():
                v.copy_(torch.randn(v.shape, generator=g) * 0.5)
                theirs[f].copy_(v)
    merged = adapter.merge(theta, phi)
    for mod, layer in layers.items():
        key = f"{mod}.weight"
        want = layer.get_delta_weight("default").detach()
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(merged[key] - theta[key], want, atol=1e-6, rtol=0)
    assert {k for k in theta if not torch.equal(merged[k], theta[k])} == {f"{m}.weight" for m in TARGETS}


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_adapt_trains_only_the_targeted_weights_and_is_differentiable(name):
    torch.manual_seed(0)
    block = Block()
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in block.named_parameters()}
    x = torch.randn(4, 16)

    def loss(p):
        h = torch.nn.functional.linear(x, p["to_q.weight"], p["to_q.bias"])
        return ((h - 1.0) ** 2).mean()

    from resalign.components import FinetuneConfig

    adapter = get_registry().create("adapter", name, {"rank": 2, "targets": ["to_q"]})
    cfg = FinetuneConfig(adapter=name, lr=0.1, steps=5, optimizer="adam")
    res = adapter.adapt(theta, loss, cfg, generator=torch.Generator().manual_seed(0))
    assert res.losses[-1] < res.losses[0]
    changed = {k for k in theta if not torch.equal(res.theta_ft[k], theta[k].detach())}
    assert changed == {"to_q.weight"}
    # the differentiable path: θ_FT depends on θ (what the unrolled solver differentiates)
    ft = adapter.adapt(theta, loss, cfg, differentiable=True, generator=torch.Generator().manual_seed(0)).theta_ft
    torch.testing.assert_close(ft["to_q.weight"].detach(), res.theta_ft["to_q.weight"], atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(loss(ft), [theta["to_q.weight"]])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
