"""R(θ) of Eq. 3: distillation of the noise prediction to the frozen original model ε_{θ_0}."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from resalign.components import Component, DenoiseBatch, DiffusionContext, Params
from resalign.losses._common import noised, per_sample_mse


class Distill(Component):
    """R(θ) = E[w_t ‖ε_θ(x_t, p, t) − ε_{θ_0}(x_t, p, t)‖²] on preservation prompt-image pairs."""

    name: ClassVar[str] = "distill"

    def __call__(self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None):
        x_t, _, t, w = noised(ctx, batch, generator)
        with torch.no_grad():
            target = ctx.model(ctx.theta0, x_t, t, batch.cond)
        return (w * per_sample_mse(ctx.model(params, x_t, t, batch.cond), target)).mean()


REGULARIZERS = (Distill,)
