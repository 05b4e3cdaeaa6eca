"""Fine-tuning losses L_FT of the simulated (and real) downstream adaptation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from resalign import fastpath
from resalign.components import Component, DenoiseBatch, DiffusionContext, Params
from resalign.errors import DataError
from resalign.losses._common import denoising_loss, denoising_losses


class Denoise(Component):
    """The standard denoising loss E[w_t ‖ε_θ(x_t, c, t) − ε‖²] on fine-tuning pairs."""

    name: ClassVar[str] = "denoise"

    def __call__(self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None):
        return denoising_loss(ctx, params, batch, generator)


class PriorPreservation(Component):
    """DreamBooth's prior-preserved loss: denoise(D_FT) + λ · denoise(class images of the original model).

    On the fast path (:mod:`resalign.fastpath`) both terms come from one model call over the instance
    and class pairs (:func:`~resalign.losses._common.denoising_losses`), as in diffusers' script.
    """

    name: ClassVar[str] = "prior_preservation"
    needs_prior: ClassVar[bool] = True

    @dataclass
    class Config:
        prior_weight: float = 1.0

    def __call__(self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None):
        if batch.prior is None:
            raise DataError("finetune loss 'prior_preservation' needs prior (class) pairs in the batch")
        if fastpath.enabled():
            inst, prior = denoising_losses(ctx, params, [batch, batch.prior], generator)
            return inst + self.config.prior_weight * prior
        return denoising_loss(ctx, params, batch, generator) + self.config.prior_weight * denoising_loss(
            ctx, params, batch.prior, generator
        )


FINETUNE_LOSSES = (Denoise, PriorPreservation)
