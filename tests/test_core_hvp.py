"""Functional UNet and Hessian-vector products on a tiny diffusers UNet."""

from __future__ import annotations

import torch
from fixtures.tiny import hvp_and_finite_difference, random_batch, tiny_context

from resalign.core import tree
from resalign.core.hvp import make_hvp
from resalign.losses._common import denoising_loss


def _loss(ctx, batch, seed=0):
    return lambda p: denoising_loss(ctx, p, batch, torch.Generator().manual_seed(seed))


def test_functional_call_matches_the_module_and_leaves_it_untouched():
    ctx = tiny_context()
    b = random_batch(2)
    t = torch.tensor([10, 500])
    ref = ctx.model.unet(b.x0, t, encoder_hidden_states=b.cond).sample
    assert torch.allclose(ctx.model(ctx.theta0, b.x0, t, b.cond), ref, atol=1e-6)
    shifted = {k: v + 0.01 for k, v in ctx.theta0.items()}
    out = ctx.model(shifted, b.x0, t, b.cond)
    assert not torch.allclose(out, ref, atol=1e-4)
    assert torch.allclose(ctx.model.unet(b.x0, t, encoder_hidden_states=b.cond).sample, ref)


def test_hvp_matches_finite_differences_of_gradients_float64():
    ctx = tiny_context(dtype=torch.float64)
    batch = random_batch(2, dtype=torch.float64)
    loss = _loss(ctx, batch)
    theta = tree.detach(ctx.theta0)
    hv, fd = hvp_and_finite_difference(loss, theta)
    cos = float(tree.dot(hv, fd)) / (tree.norm(hv) * tree.norm(fd))
    assert cos > 0.999
    assert abs(tree.norm(hv) - tree.norm(fd)) / tree.norm(fd) < 1e-3


def test_hvp_is_linear_and_symmetric():
    ctx = tiny_context(dtype=torch.float64)
    hvp = make_hvp(_loss(ctx, random_batch(2, dtype=torch.float64)), ctx.theta0)
    g = torch.Generator().manual_seed(5)
    u = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in ctx.theta0.items()}
    w = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in ctx.theta0.items()}
    hu, hw = hvp(u), hvp(w)
    assert abs(float(tree.dot(u, hw)) - float(tree.dot(w, hu))) < 1e-8 * tree.norm(hu) * tree.norm(w)
    h_sum = hvp(tree.add(u, w, 2.0))
    assert tree.norm(tree.add(h_sum, tree.add(hu, hw, 2.0), -1.0)) < 1e-7 * tree.norm(h_sum)
