"""Harmful losses, the distillation regularizer and fine-tuning losses against direct computations."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny import random_batch, tiny_context

from resalign.errors import ConfigError, DataError
from resalign.registry import get_registry


def create(kind, name, **options):
    return get_registry().create(kind, name, options)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def reference(ctx, batch, seed=0):
    """x_t, ε, t drawn the way the losses draw them, and the module's own ε_θ0 helper."""
    noise, t = ctx.schedule.sample(batch.x0, gen(seed))
    x_t = ctx.schedule.add_noise(batch.x0, noise, t)
    a = ctx.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * batch.x0 + (1 - a).sqrt() * noise)

    def eps(cond, unet=ctx.model.unet):
        with torch.no_grad():
            return unet(x_t, t, encoder_hidden_states=cond).sample

    return x_t, noise, t, eps


def shifted(ctx, s=0.02):
    return {k: v + s * torch.randn(v.shape, generator=gen(9)) for k, v in ctx.theta0.items()}


def test_registered_names():
    reg = get_registry()
    assert {"ga", "esd", "ca"} <= set(reg.names("harmful-loss"))
    assert "distill" in reg.names("regularizer")
    assert {"denoise", "prior_preservation"} <= set(reg.names("finetune-loss"))


def test_gradient_ascent_is_the_negative_denoising_loss_and_cap_clips_per_sample():
    ctx = tiny_context()
    b = random_batch(3)
    _, noise, _, eps = reference(ctx, b)
    mse = ((eps(b.cond) - noise) ** 2).flatten(1).mean(1)
    assert create("harmful-loss", "ga")(ctx, ctx.theta0, b, gen()).item() == pytest.approx(-mse.mean().item(), rel=1e-5)
    cap = float(mse.median())
    capped = create("harmful-loss", "ga", cap=cap)(ctx, ctx.theta0, b, gen())
    assert capped.item() == pytest.approx(-torch.clamp(mse, max=cap).mean().item(), rel=1e-5)
    # a cap below every sample's loss: nothing left to ascend, zero gradient
    p = {k: v.clone().requires_grad_(True) for k, v in ctx.theta0.items()}
    loss = create("harmful-loss", "ga", cap=float(mse.min()) / 2)(ctx, p, b, gen())
    grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    with pytest.raises(ConfigError):
        create("harmful-loss", "ga", cap=-1.0)


@pytest.mark.parametrize("eta, from_uncond", [(1.0, False), (2.0, False), (1.0, True)])
def test_esd_regresses_onto_the_negatively_guided_target(eta, from_uncond):
    ctx = tiny_context()
    b = random_batch(2)
    p = shifted(ctx)
    _, _, t, eps = reference(ctx, b)
    e_c, e_u = eps(b.cond), eps(ctx.uncond.expand(2, -1, -1))
    target = (e_u if from_uncond else e_c) - eta * (e_c - e_u)
    x_t, *_ = reference(ctx, b)
    pred = ctx.model(p, x_t, t, b.cond)
    expected = ((pred - target) ** 2).mean()
    loss = create("harmful-loss", "esd", eta=eta, from_uncond=from_uncond)(ctx, p, b, gen())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # with η = 0 and c_from = c the original model is already at the target
    assert create("harmful-loss", "esd", eta=0.0)(ctx, ctx.theta0, b, gen()).item() < 1e-10


def test_concept_ablation_matches_the_anchor_prediction_with_stop_gradient():
    ctx = tiny_context()
    b = random_batch(2, anchor=True)
    p = {k: v.clone().requires_grad_(True) for k, v in shifted(ctx).items()}
    x_t, _, t, eps = reference(ctx, b)
    target = eps(b.anchor_cond)
    loss = create("harmful-loss", "ca")(ctx, p, b, gen())
    assert loss.item() == pytest.approx(((ctx.model(p, x_t, t, b.cond) - target) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    assert all(v.grad is None for v in ctx.theta0.values())
    # anchor = the prompt itself: the original model already satisfies it
    b.anchor_cond = b.cond
    assert create("harmful-loss", "ca")(ctx, ctx.theta0, b, gen()).item() < 1e-10


def test_distill_is_zero_at_the_original_model_and_positive_elsewhere():
    ctx = tiny_context()
    b = random_batch(2)
    reg = create("regularizer", "distill")
    assert reg(ctx, ctx.theta0, b, gen()).item() < 1e-12
    p = shifted(ctx)
    x_t, _, t, eps = reference(ctx, b)
    expected = ((ctx.model(p, x_t, t, b.cond) - eps(b.cond)) ** 2).mean()
    assert reg(ctx, p, b, gen()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_finetune_losses():
    ctx = tiny_context()
    b = random_batch(2, prior=True)
    _, noise, _, eps = reference(ctx, b)
    denoise = create("finetune-loss", "denoise")(ctx, ctx.theta0, b, gen())
    assert denoise.item() == pytest.approx(((eps(b.cond) - noise) ** 2).mean().item(), rel=1e-5)
    g = gen()
    den = create("finetune-loss", "denoise")
    expected = den(ctx, ctx.theta0, b, g) + 0.5 * den(ctx, ctx.theta0, b.prior, g)
    pp = create("finetune-loss", "prior_preservation", prior_weight=0.5)(ctx, ctx.theta0, b, gen())
    assert pp.item() == pytest.approx(expected.item(), rel=1e-5)
    b.prior = None
    with pytest.raises(DataError):
        create("finetune-loss", "prior_preservation")(ctx, ctx.theta0, b, gen())
