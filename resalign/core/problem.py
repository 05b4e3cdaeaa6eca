"""One simulated fine-tuning and its hypergradient problem (Alg. 2 lines 6-8, Alg. 1's inputs).

:func:`build_hypergrad_problem` turns (θ, configuration C, data D_FT, seed) into a
:class:`~resalign.components.HypergradProblem`: θ_FT = ADAPT(θ, D_FT, C), g = ∇L_harm(θ_FT), a closure
v ↦ ∇²L_FT(θ_FT)·v (built on first use) and, when asked, ``unroll()`` that recomputes θ_FT(θ) with the
adaptation graph kept. :func:`simulate` hands it to a solver. Both are pure functions of their
arguments, so the J simulations of an outer step can be computed anywhere, in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from resalign.components import (
    Adapter,
    DenoiseBatch,
    DiffusionContext,
    FinetuneConfig,
    FinetuneLoss,
    HarmfulLoss,
    HypergradProblem,
    Params,
    Solver,
)
from resalign.core import seeds, tree
from resalign.core.functional import second_order
from resalign.core.hvp import make_hvp


@dataclass
class SimulationData:
    """D_FT for one simulated fine-tuning (with DreamBooth prior pairs if needed) and the harmful pairs of g."""

    ft: DenoiseBatch
    harm: DenoiseBatch


def _take(batch: DenoiseBatch, idx: torch.Tensor) -> DenoiseBatch:
    return DenoiseBatch(
        x0=batch.x0[idx],
        cond=batch.cond[idx],
        prompts=[batch.prompts[i] for i in idx.tolist()] if batch.prompts else [],
        anchor_cond=batch.anchor_cond[idx] if batch.anchor_cond is not None else None,
        prior=_take(batch.prior, idx % batch.prior.x0.shape[0]) if batch.prior is not None else None,
    )


class FinetuneObjective:
    """L_FT over the steps of one ADAPT run: step i uses the i-th minibatch of D_FT and its own noise.

    Calling it advances one step; :meth:`fresh` restarts the sequence (the unrolled recomputation
    sees exactly the batches and noise of the first run). :meth:`full` is L_FT on all of D_FT with
    fixed noise: the fine-tuning loss whose Hessian enters Eq. 6.
    """

    def __init__(self, ctx: DiffusionContext, loss: FinetuneLoss, data: DenoiseBatch, batch_size: int, seed: int):
        self.ctx, self.loss, self.data, self.batch_size, self.seed = ctx, loss, data, batch_size, seed
        self.step = 0

    def fresh(self) -> FinetuneObjective:
        return FinetuneObjective(self.ctx, self.loss, self.data, self.batch_size, self.seed)

    def __call__(self, params: Params) -> torch.Tensor:
        n = self.data.x0.shape[0]
        idx = (torch.arange(self.batch_size) + self.step * self.batch_size) % n
        gen = seeds.generator(self.seed, "ft-noise", self.step)
        self.step += 1
        return self.loss(self.ctx, params, _take(self.data, idx), gen)

    def full(self, params: Params) -> torch.Tensor:
        return self.loss(self.ctx, params, self.data, seeds.generator(self.seed, "hvp-noise"))


def build_hypergrad_problem(
    ctx: DiffusionContext,
    theta: Params,
    config: FinetuneConfig,
    data: SimulationData,
    *,
    adapter: Adapter,
    finetune_loss: FinetuneLoss,
    harmful_loss: HarmfulLoss,
    seed: int,
    gamma: float = 1.0,
    with_unroll: bool = True,
    cache: dict[str, Any] | None = None,
) -> tuple[HypergradProblem, dict[str, Any]]:
    """The hypergradient problem of one sampled configuration C at θ (W-space parameters).

    Returns the problem and what was measured on the way (adaptation losses, L_harm(θ_FT)).
    """
    theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    objective = FinetuneObjective(ctx, finetune_loss, data.ft, config.batch_size, seed)
    adapted = adapter.adapt(theta, objective, config, differentiable=False,
                            generator=seeds.generator(seed, "adapt-init"))
    theta_ft = tree.detach(adapted.theta_ft)

    def harm_loss(p: Params) -> torch.Tensor:
        return harmful_loss(ctx, p, data.harm, seeds.generator(seed, "harm-noise"))

    at_ft = {k: v.detach().requires_grad_(True) for k, v in theta_ft.items()}
    loss_ft = harm_loss(at_ft)
    grad_harm = tree.grads_or_zeros(torch.autograd.grad(loss_ft, list(at_ft.values()), allow_unused=True), at_ft)

    hvp_holder: list = []

    def hvp_ft(v: Params) -> Params:
        if not hvp_holder:
            hvp_holder.append(make_hvp(objective.full, theta_ft))
        return hvp_holder[0](v)

    def unroll() -> Params:
        with second_order():
            return adapter.adapt(theta, objective.fresh(), config, differentiable=True,
                                 generator=seeds.generator(seed, "adapt-init")).theta_ft

    problem = HypergradProblem(
        theta=theta,
        theta_ft=theta_ft,
        grad_harm=grad_harm,
        hvp_ft=hvp_ft,
        gamma=gamma,
        unroll=unroll if with_unroll else None,
        harm_loss=harm_loss,
        cache=cache if cache is not None else {},
    )
    info = {
        "config": config.label(),
        "adapt_loss_first": adapted.losses[0] if adapted.losses else None,
        "adapt_loss_last": adapted.losses[-1] if adapted.losses else None,
        "harm_ft": float(loss_ft.detach()),
        "delta_norm": tree.norm(tree.add(theta_ft, tree.detach(theta), -1.0)),
    }
    return problem, info


def simulate(
    ctx: DiffusionContext,
    theta: Params,
    config: FinetuneConfig,
    data: SimulationData,
    *,
    adapter: Adapter,
    finetune_loss: FinetuneLoss,
    harmful_loss: HarmfulLoss,
    solver: Solver,
    seed: int,
    gamma: float = 1.0,
    cache: dict[str, Any] | None = None,
) -> tuple[Params, dict[str, Any]]:
    """(θ, C, D_FT, seed) ↦ the hypergradient ∇_θ L_harm(θ_FT) estimated by ``solver``, and diagnostics."""
    problem, info = build_hypergrad_problem(
        ctx, theta, config, data, adapter=adapter, finetune_loss=finetune_loss, harmful_loss=harmful_loss,
        seed=seed, gamma=gamma, with_unroll=getattr(solver, "needs_trajectory", False), cache=cache,
    )
    result = solver.solve(problem)
    info.update(result.diagnostics)
    info["hypergrad_norm"] = tree.norm(result.hypergrad)
    return tree.detach(result.hypergrad), info
