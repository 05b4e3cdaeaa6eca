"""The ADAPT loop shared by every built-in method: train a few tensors φ, map them to base space.

A method defines its trainable tensors φ (``init``) and how they combine with θ into base-space
parameters (``merge``): full fine-tuning φ = θ's entries, LoRA W + s·BA, SVDiff U diag(relu(σ+δ)) Vᵀ.
``adapt`` runs ``cfg.steps`` steps of the configured optimizer on L_FT(merge(θ, φ)) (gradients
clipped to ``cfg.max_grad_norm`` when set) and returns θ_FT = merge(θ, φ_T), the deltas merged, as
Alg. 2 needs. The same ``adapt`` is downstream fine-tuning (:mod:`resalign.eval.protocol.finetune`).

Without a graph to keep (``differentiable=False``), the fast path (:mod:`resalign.fastpath`) makes φ
leaves once and updates them in place with the optimizer's fused kernel (``fused_step_``) between
steps (on the compiled path, with the model's calls compiled: :mod:`resalign.core.compiled`); the
reference path re-makes the leaves every step and updates them with ``step_``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from resalign import fastpath, ops
from resalign.adapters._optim import fusable, make_optimizer
from resalign.components import AdaptResult, Component, FinetuneConfig, Params
from resalign.errors import ConfigError


class MergedAdapter(Component):
    name: ClassVar[str] = "merged"
    #: learning rate of the method's reference training script (App. B.2), downstream default
    paper_lr: ClassVar[float] = 1e-5
    #: the L_FT this method prescribes (None: the configuration's)
    finetune_loss: ClassVar[str | None] = None

    def init(self, theta: Params, generator: torch.Generator | None) -> Params:
        """The initial trainable tensors φ_0 (may reference ``theta``'s tensors)."""
        raise NotImplementedError

    def merge(self, theta: Params, phi: Params) -> Params:
        """Base-space parameters for θ and φ (differentiable in both)."""
        raise NotImplementedError

    def lr_multiplier(self) -> float:
        return 1.0

    def adapt(
        self,
        theta: Params,
        loss: Callable[[Params], torch.Tensor],
        cfg: FinetuneConfig,
        *,
        differentiable: bool = False,
        generator: Any = None,
    ) -> AdaptResult:
        if cfg.steps < 0:
            raise ConfigError(f"{self.name}: steps must be >= 0, got {cfg.steps}")
        if differentiable:
            # the fused attention kernels have no double backward: record the graph with the math kernel
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                return self._run(theta, loss, cfg, True, generator)
        return self._run(theta, loss, cfg, False, generator)

    def _run(self, theta: Params, loss, cfg: FinetuneConfig, differentiable: bool, generator: Any) -> AdaptResult:
        opt = make_optimizer(cfg.optimizer, cfg.lr * self.lr_multiplier(), cfg.weight_decay)
        if differentiable:
            phi = self.init(theta, generator)
            phi = {k: (v if v.requires_grad else v.detach().requires_grad_(True)) for k, v in phi.items()}
            base = theta
        else:
            base = {k: v.detach() for k, v in theta.items()}
            phi = {k: v.detach().clone() for k, v in self.init(base, generator).items()}
            if fastpath.enabled() and fusable(list(phi.values())):
                return self._run_fused(base, phi, loss, cfg, opt)
        state = opt.init(phi)
        losses: list[float] = []
        for _ in range(cfg.steps):
            if differentiable:
                value = loss(self.merge(base, phi))
                grads = torch.autograd.grad(value, list(phi.values()), create_graph=True, allow_unused=True)
                phi, state = opt.step(phi, self._clipped(ops.grads_or_zeros(grads, phi), cfg), state)
            else:  # no graph needs the old φ: update it (and the optimizer's moments) in place
                leaves = {k: v.requires_grad_(True) for k, v in phi.items()}
                value = loss(self.merge(base, leaves))
                grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
                grads = self._clipped(ops.grads_or_zeros(grads, leaves), cfg)
                phi = ops.detach(leaves)
                state = opt.step_(phi, grads, state)
                del grads
            losses.append(float(value.detach()))
        merged = self.merge(base, phi)
        if not differentiable:
            merged = ops.detach(merged)
        return AdaptResult(merged, losses)

    def _run_fused(self, base: Params, phi: Params, loss, cfg: FinetuneConfig, opt) -> AdaptResult:
        """The non-differentiable loop of :meth:`_run` on the fast path: φ's tensors are the leaves of
        every step's graph and are updated in place (no graph needs their old values), with the
        optimizer's fused kernel; the same steps as the reference loop up to the kernel's rounding."""
        leaves = {k: v.requires_grad_(True) for k, v in phi.items()}
        params = list(leaves.values())
        state = opt.fused_init(params)
        losses: list[float] = []
        for _ in range(cfg.steps):
            with fastpath.compile_region():  # the model's calls may run compiled (first-order only)
                value = loss(self.merge(base, leaves))
                grads = torch.autograd.grad(value, params, allow_unused=True)
            if any(g is None for g in grads):
                grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            if cfg.max_grad_norm:
                grads = list(ops.clip_by_norm(dict(zip(leaves, grads)), cfg.max_grad_norm).values())
            opt.fused_step_(params, list(grads), state)
            del grads
            losses.append(float(value.detach()))
        return AdaptResult(ops.detach(self.merge(base, ops.detach(leaves))), losses)

    @staticmethod
    def _clipped(grads: Params, cfg: FinetuneConfig) -> Params:
        return ops.clip_by_norm(grads, cfg.max_grad_norm) if cfg.max_grad_norm else grads
