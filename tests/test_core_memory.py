"""Activation memory of the HVP: block checkpointing and autocast keep the products of Alg. 1 exact enough."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fixtures.tiny import random_batch, tiny_context
from torch.utils.checkpoint import CheckpointError

from resalign.core import tree
from resalign.core.curvature import make_curvature
from resalign.core.functional import FunctionalUNet
from resalign.losses._common import denoising_loss


def _away_from_module(ctx, scale=0.05, seed=1):
    """θ_FT ≠ the module's own tensors: a recomputation that fell back to them would be caught."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std().nan_to_num(0.0).clamp_min(1e-3) * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in ctx.theta0.items()}


def _direction(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    return tree.scale(v, 1.0 / tree.norm(v))


def _product(ctx, kind, params, v, batch):
    loss = lambda c, p: denoising_loss(c, p, batch, torch.Generator().manual_seed(0))
    return make_curvature(kind, ctx, loss, params)(v)


def _rel(a, b) -> float:
    return tree.norm(tree.add(a, b, -1.0)) / tree.norm(b)


@pytest.mark.parametrize("kind", ["hessian", "gauss-newton"])
def test_checkpointed_blocks_give_the_same_curvature_products(kind):
    ctx = tiny_context()
    batch = random_batch(2)
    theta_ft = _away_from_module(ctx)
    v = _direction(theta_ft)
    plain = _product(ctx, kind, theta_ft, v, batch)
    ckpt_ctx = dataclasses.replace(ctx, model=FunctionalUNet(tiny_context().model.unet, checkpointing=True))
    recorded = []
    from torch.utils import checkpoint as ckpt_module

    original = ckpt_module.checkpoint

    def counting(*a, **kw):
        recorded.append(kw.get("use_reentrant"))
        return original(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("resalign.core.functional.checkpoint", counting)
        checkpointed = _product(ckpt_ctx, kind, theta_ft, v, batch)
    assert recorded and set(recorded) == {False}  # the blocks really were checkpointed, non-reentrant
    assert _rel(checkpointed, plain) < 1e-5
    # diffusers' own checkpoint function recomputes with the module's tensors (θ_0), not θ_FT: the
    # products come out wrong, or torch notices the recomputation differs from the forward pass
    stock = tiny_context().model.unet
    stock.enable_gradient_checkpointing()
    try:
        wrong = _product(dataclasses.replace(ctx, model=FunctionalUNet(stock)), kind, theta_ft, v, batch)
    except CheckpointError:
        return
    assert _rel(wrong, plain) > 1e-3


#: unit roundoff of the autocast dtypes (8 and 11 significant bits)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("kind", ["hessian", "gauss-newton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_products_stay_close_to_fp32(kind, dtype):
    """A product under autocast rounds every activation, and the gradients built from them, to the
    compute dtype: on the order of a hundred roundings of relative size u along its forward, backward
    and double-backward passes through the tiny UNet's ~20 layers. The bound is 25·u (0.098 for bf16,
    0.012 for fp16; measured 0.024–0.034 and 0.0039–0.0043): far below the 1/(1 + γλ_max) contraction
    of a Richardson step, and a product that ignored autocast would not differ from fp32 at all."""
    ctx = tiny_context()
    batch = random_batch(2)
    theta_ft = _away_from_module(ctx)
    v = _direction(theta_ft)
    fp32 = _product(ctx, kind, theta_ft, v, batch)
    low = _product(dataclasses.replace(ctx, model=FunctionalUNet(ctx.model.unet, compute_dtype=dtype)), kind,
                   theta_ft, v, batch)
    assert all(t.dtype == torch.float32 for t in low.values())  # fp32 master weights, fp32 products
    u = UNIT_ROUNDOFF[dtype]
    assert u / 100 < _rel(low, fp32) < 25 * u
