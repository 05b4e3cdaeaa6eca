"""Hessian-vector products ∇²L(θ)·v by double backward (reverse-over-reverse).

The gradient is taken once with ``create_graph=True`` and its graph kept, so each further HVP costs
one extra backward pass (Alg. 1 needs K − 1 of them at the same θ_FT).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from resalign.components import Params
from resalign.core import tree
from resalign.core.functional import second_order


class HVP:
    """v ↦ ∇²_θ L(θ)·v at a fixed θ, for a loss ``loss_fn(params) -> scalar`` (fixed batch and noise)."""

    def __init__(self, loss_fn: Callable[[Params], torch.Tensor], params: Params):
        self.params = tree.aliases(params)
        with second_order():
            self.loss = loss_fn(self.params)
            grads = torch.autograd.grad(self.loss, list(self.params.values()), create_graph=True, allow_unused=True)
        self.grad = tree.grads_or_zeros(grads, self.params)
        # only gradients that still depend on the parameters contribute a second derivative
        self._live = [k for k, g in zip(self.params, grads) if g is not None and g.requires_grad]
        self.calls = 0

    def __call__(self, v: Params) -> Params:
        self.calls += 1
        if not self._live:
            return tree.zeros_like(self.params)
        outs = [self.grad[k] for k in self._live]
        vs = [v[k].to(self.grad[k].dtype) for k in self._live]
        hv = torch.autograd.grad(outs, list(self.params.values()), grad_outputs=vs, retain_graph=True, allow_unused=True)
        return {k: h.detach() for k, h in tree.grads_or_zeros(hv, self.params).items()}


def make_hvp(loss_fn: Callable[[Params], torch.Tensor], params: Params) -> HVP:
    """The HVP closure of ``loss_fn`` at ``params`` (see :class:`HVP`)."""
    return HVP(loss_fn, params)
