"""The curvature operator of Eq. 6: v ↦ C·v with C = ∇²L_FT(θ_FT) or a positive semi-definite stand-in.

Eq. 6 solves (C + I/γ) x = g/γ. With C the Hessian (the paper) the system is well posed only while
every eigenvalue of C exceeds −1/γ; a fine-tuning loss evaluated away from a minimum has negative
curvature, and then no relaxation makes Richardson converge (``resalign.solvers.richardson``).

``gauss-newton`` is the generalised Gauss–Newton matrix of L_FT = ℓ(f(θ)), with f the UNet outputs the
loss reads and ℓ the (convex) loss of those outputs:

    G = Jᵀ (∇²_f ℓ) J,      J = ∂f/∂θ,

i.e. the Hessian without the term Σ_i (∂ℓ/∂f_i) ∇²f_i that the residuals carry. For the denoising
loss ℓ = Σ w_i ‖f_i − ε_i‖² / n, ∇²_f ℓ = 2 diag(w_i)/n ⪰ 0, so G ⪰ 0 and I + γG is positive definite
for every γ > 0. G equals the Hessian where the model is linear in θ (linear least squares) or where
the residuals vanish. Each product costs a forward pass with tangents (J·v) and a backward pass
through the saved graph (Jᵀ·u), about as much as a Hessian-vector product.

The products work with any fine-tuning loss: the model outputs that carry a gradient are recorded
while the loss is evaluated, whatever the loss does with them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from resalign.components import DiffusionContext, Params
from resalign.core import tree
from resalign.core.functional import second_order
from resalign.core.hvp import HVP
from resalign.errors import ConfigError

#: The curvature operators a hypergradient problem can use.
CURVATURES = ("hessian", "gauss-newton")

#: L_FT evaluated through a context: ``loss_fn(ctx, params) -> scalar`` (fixed batch and noise).
ContextLoss = Callable[[DiffusionContext, Params], torch.Tensor]


class _RecordingModel:
    """ctx.model, recording every output (``which``: the indices of those that depend on θ)."""

    def __init__(self, model: Any, outputs: list[torch.Tensor]):
        self._model, self._outputs = model, outputs

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._model(*args, **kwargs)
        self._outputs.append(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _load_jvp_decompositions() -> None:
    """Import torch's forward-AD decompositions, as ``make_dual`` does on its first call, with the
    FutureWarning about ``torch.jit.script`` that this import raises silenced (this import only)."""
    if os.environ.get("PYTORCH_JIT", "1") != "1" or not __debug__:
        return  # make_dual does not load them either
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script", category=FutureWarning)
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # a torch without them: make_dual has nothing to load
            pass


class GaussNewton:
    """v ↦ Jᵀ (∇²_f ℓ) J v at fixed θ (see the module docstring), for ``loss_fn(ctx, params)``.

    J·v is a forward-mode product (the loss runs once more on dual parameters and keeps no graph), Jᵀ·u a backward pass through the one saved forward graph.
    Memory: that graph and the vectors; no second graph and no W-sized Jᵀ·p tensor, as the
    double-vjp form of J·v would need.
    """

    def __init__(self, ctx: DiffusionContext, loss_fn: ContextLoss, params: Params):
        self.params = tree.aliases(params)
        self.ctx, self.loss_fn = ctx, loss_fn
        recorded: list[torch.Tensor] = []
        recording = dataclasses.replace(ctx, model=_RecordingModel(ctx.model, recorded))
        self.calls = 0
        with second_order():
            self.loss = loss_fn(recording, self.params)
            self._which = [i for i, o in enumerate(recorded) if o.requires_grad]
            self.outputs = [recorded[i] for i in self._which]
            # ∇_f ℓ with its graph: differentiating it once more w.r.t. f gives (∇²_f ℓ)·u
            self._grad_f = (torch.autograd.grad(self.loss, self.outputs, create_graph=True, allow_unused=True)
                            if self.outputs else [])

    def jvp(self, v: Params) -> list[torch.Tensor]:
        """J·v, one tensor per recorded output: forward mode, with dual parameters (no_grad: no
        backward graph is recorded, and blocks are not checkpointed; autocast applies as in the
        first pass)."""
        import torch.autograd.forward_ad as fwad

        _load_jvp_decompositions()
        recorded: list[torch.Tensor] = []
        with torch.no_grad(), second_order(), fwad.dual_level():
            dual = {k: fwad.make_dual(p.detach(), v[k].to(p.dtype)) for k, p in self.params.items()}
            self.loss_fn(dataclasses.replace(self.ctx, model=_RecordingModel(self.ctx.model, recorded)), dual)
            jv = [fwad.unpack_dual(recorded[i]).tangent for i in self._which]
        return [t if t is not None else torch.zeros_like(o) for t, o in zip(jv, self.outputs)]

    def __call__(self, v: Params) -> Params:
        self.calls += 1
        if not self.outputs:
            return tree.zeros_like(self.params)
        jv = self.jvp(v)
        pairs = [(g, o, u) for g, o, u in zip(self._grad_f, self.outputs, jv) if g is not None and g.requires_grad]
        if not pairs:
            return tree.zeros_like(self.params)
        hjv = torch.autograd.grad([g for g, _, _ in pairs], [o for _, o, _ in pairs],
                                  grad_outputs=[u for _, _, u in pairs], retain_graph=True, allow_unused=True)
        used = [(o, h) for (_, o, _), h in zip(pairs, hjv) if h is not None]
        gv = torch.autograd.grad([o for o, _ in used], list(self.params.values()),
                                 grad_outputs=[h for _, h in used], retain_graph=True, allow_unused=True)
        return {k: g.detach() for k, g in tree.grads_or_zeros(gv, self.params).items()}


def make_curvature(kind: str, ctx: DiffusionContext, loss_fn: ContextLoss, params: Params):
    """The product v ↦ C·v of curvature ``kind`` (``hessian`` or ``gauss-newton``) of L_FT at ``params``."""
    if kind == "hessian":
        return HVP(lambda p: loss_fn(ctx, p), params)
    if kind == "gauss-newton":
        return GaussNewton(ctx, loss_fn, params)
    raise ConfigError(f"curvature {kind!r}: expected one of {', '.join(CURVATURES)}")
