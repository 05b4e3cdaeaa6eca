"""Shared pieces of the diffusion losses: q(x_t | x_0) samples and the weighted per-sample MSE."""

from __future__ import annotations

from typing import Any

import torch

from resalign.components import DenoiseBatch, DiffusionContext


def noised(ctx: DiffusionContext, batch: DenoiseBatch, generator: Any = None):
    """(x_t, ε, t, w_t) for a batch: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with t, ε drawn from ``generator``."""
    noise, t = ctx.schedule.sample(batch.x0, generator)
    x_t = ctx.schedule.add_noise(batch.x0, noise, t)
    return x_t, noise, t, ctx.schedule.weight(t).to(batch.x0.device)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖² averaged over all but the batch dimension, shape (B,).

    Written as ``((pred - target) ** 2).mean`` rather than ``F.mse_loss`` so that forward-over-reverse
    differentiation also works.
    """
    return ((pred - target) ** 2).flatten(1).mean(1)


def denoising_loss(ctx: DiffusionContext, params, batch: DenoiseBatch, generator: Any = None) -> torch.Tensor:
    """E[w_t ‖ε_θ(x_t, c, t) − ε‖²], the standard diffusion loss."""
    x_t, noise, t, w = noised(ctx, batch, generator)
    return (w * per_sample_mse(ctx.model(params, x_t, t, batch.cond), noise)).mean()


def denoising_losses(ctx: DiffusionContext, params, batches: list[DenoiseBatch], generator: Any = None
                     ) -> list[torch.Tensor]:
    """:func:`denoising_loss` of each batch, in one model call over all of them when their shapes allow.

    (x_t, ε, t) are drawn batch after batch from ``generator``, as consecutive :func:`denoising_loss`
    calls draw them, so the losses equal those calls' up to the rounding of batched kernels (diffusers'
    ``train_dreambooth.py`` denoises instance and class images in one batch the same way).
    """
    drawn = [noised(ctx, b, generator) for b in batches]
    joint = len(batches) > 1 and all(
        b.x0.shape[1:] == batches[0].x0.shape[1:] and b.cond.shape[1:] == batches[0].cond.shape[1:]
        and b.x0.dtype == batches[0].x0.dtype and b.cond.dtype == batches[0].cond.dtype for b in batches)
    if joint:
        pred = ctx.model(params, torch.cat([d[0] for d in drawn]), torch.cat([d[2] for d in drawn]),
                         torch.cat([b.cond for b in batches]))
        preds = pred.split([b.x0.shape[0] for b in batches])
    else:
        preds = [ctx.model(params, x_t, t, b.cond) for b, (x_t, _, t, _) in zip(batches, drawn)]
    return [(w * per_sample_mse(p, noise)).mean() for p, (_, noise, _, w) in zip(preds, drawn)]


def expand_uncond(ctx: DiffusionContext, n: int) -> torch.Tensor:
    return ctx.uncond.expand(n, *ctx.uncond.shape[1:])
