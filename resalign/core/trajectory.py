"""The iterates of a simulated fine-tuning, replayed: θ_0, θ_1, …, θ_{T−1} of ADAPT(θ, D_FT, C), then θ_T.

An ADAPT method calls its ``loss(params)`` once per step, the t-th call at the base-space parameters
after t steps (:class:`~resalign.components.Adapter`), so wrapping that loss sees every iterate of
any adapter, built-in or plugin, without the adapter knowing. :func:`replay_adapt` re-runs the
adaptation without a graph on a fresh copy of the same objective (same batches, noise and
initialisation as the first run, as ``unroll()`` does with a graph) and hands each iterate to
``visit(t, θ_t)`` before its step. Nothing is stored: a visitor that keeps an iterate must copy it
(the adapter updates its tensors in place after ``visit`` returns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from resalign.components import Adapter, FinetuneConfig, Params

#: ``visit(t, θ_t)``: called at each iterate t = 0 … T−1 of the replayed fine-tuning, before its step.
Visitor = Callable[[int, Params], None]


def replay_adapt(adapter: Adapter, theta: Params, loss: Callable[[Params], torch.Tensor], config: FinetuneConfig,
                 visit: Visitor, generator: Any = None) -> Params:
    """Run ``adapter.adapt(theta, loss, config)`` (no graph), calling ``visit(t, θ_t)`` before each
    step t = 0 … T−1; returns θ_T (θ_FT, detached). ``loss`` must be a fresh objective (its first call
    is step 0) and ``generator`` the one the first run initialised the adapter with."""
    count = [0]

    def observed(params: Params) -> torch.Tensor:
        visit(count[0], params)
        count[0] += 1
        return loss(params)

    with torch.enable_grad():
        result = adapter.adapt(theta, observed, config, differentiable=False, generator=generator)
    return {k: v.detach() for k, v in result.theta_ft.items()}
