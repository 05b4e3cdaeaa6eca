"""Harmful losses L_harmful(θ) of Eq. 3: gradient ascent (the paper's), ESD and concept ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from resalign.components import Component, DenoiseBatch, DiffusionContext, Params
from resalign.losses._common import expand_uncond, noised, per_sample_mse


class GradientAscent(Component):
    """L_harm(θ) = −E[w_t ‖ε_θ(x_t, c, t) − ε‖²] on harmful prompt-image pairs (Sec. 3).

    Unbounded below: ascending it quickly destroys the model. ``cap`` clips each sample's ascended
    loss at a ceiling, −E[w_t min(‖ε_θ − ε‖², cap)], so a sample that is already "unlearned" past the
    cap stops contributing gradient while the others continue. ``soft = true`` bounds it smoothly,
    −E[w_t · cap · tanh(‖ε_θ − ε‖² / cap)]: the same ceiling, but a sample past it still has a (shrinking)
    gradient, so L_harm(θ) and L_harm(θ_FT) stay comparable when θ sits at the cap.
    """

    name: ClassVar[str] = "ga"

    @dataclass
    class Config:
        cap: float | None = None
        soft: bool = False

        def __post_init__(self):
            if self.cap is not None and self.cap <= 0:
                raise ValueError(f"cap must be > 0, got {self.cap}")
            if self.soft and self.cap is None:
                raise ValueError("soft = true bounds the loss at cap: give cap too")

    def __call__(self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None):
        x_t, noise, t, w = noised(ctx, batch, generator)
        mse = per_sample_mse(ctx.model(params, x_t, t, batch.cond), noise)
        if self.config.cap is not None and self.config.soft:
            mse = self.config.cap * torch.tanh(mse / self.config.cap)
        elif self.config.cap is not None:
            mse = torch.clamp(mse, max=self.config.cap)
        return -(w * mse).mean()


class ESD(Component):
    """Erased Stable Diffusion (Gandikota et al. 2023): regress onto a negatively guided target.

    target = ε*(x_t, c_from, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t)) from the frozen original model ε*,
    with c_from = c by default (η = 1 then gives ε*(x_t, ∅, t), the unconditional prediction) or
    c_from = ∅ with ``from_uncond = true`` (the ESD paper's form). x_t noises the harmful images.
    """

    name: ClassVar[str] = "esd"

    @dataclass
    class Config:
        eta: float = 1.0
        from_uncond: bool = False

    def target(self, ctx: DiffusionContext, x_t, t, cond) -> torch.Tensor:
        n = x_t.shape[0]
        with torch.no_grad():
            both = ctx.model(ctx.theta0, torch.cat([x_t, x_t]), torch.cat([t, t]),
                             torch.cat([cond, expand_uncond(ctx, n)]))
            e_c, e_u = both.chunk(2)
            e_from = e_u if self.config.from_uncond else e_c
            return e_from - self.config.eta * (e_c - e_u)

    def __call__(self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None):
        x_t, _, t, w = noised(ctx, batch, generator)
        target = self.target(ctx, x_t, t, batch.cond)
        return (w * per_sample_mse(ctx.model(params, x_t, t, batch.cond), target)).mean()


class ConceptAblation(Component):
    """Concept ablation (Kumari et al. 2023, model-based): ε_θ(x_t, c_harm) → stop-grad ε*(x_t, c_anchor).

    The anchor embeddings come with the batch (``batch.anchor_cond``: the harmful prompts with the
    concept replaced by an anchor concept); without them the empty prompt is the anchor.
    """

    name: ClassVar[str] = "ca"
    needs_anchor: ClassVar[bool] = True

    @dataclass
    class Config:
        pass

    def __call__(self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None):
        x_t, _, t, w = noised(ctx, batch, generator)
        anchor = batch.anchor_cond if batch.anchor_cond is not None else expand_uncond(ctx, x_t.shape[0])
        with torch.no_grad():
            target = ctx.model(ctx.theta0, x_t, t, anchor)
        return (w * per_sample_mse(ctx.model(params, x_t, t, batch.cond), target)).mean()


HARMFUL_LOSSES = (GradientAscent, ESD, ConceptAblation)
