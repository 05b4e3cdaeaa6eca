"""One simulated fine-tuning and its hypergradient problem (Alg. 2 lines 6-8, Alg. 1's inputs).

:func:`build_hypergrad_problem` turns (θ, configuration C, data D_FT, seed) into a
:class:`~resalign.components.HypergradProblem`: θ_FT = ADAPT(θ, D_FT, C), g = ∇L_harm(θ_FT), a closure
v ↦ C·v for the curvature C of Eq. 6 (the Hessian ∇²L_FT(θ_FT) or its Gauss–Newton part, see
:mod:`resalign.core.curvature`; built on first use) and, when asked, ``unroll()`` that recomputes
θ_FT(θ) with the adaptation graph kept. :func:`simulate` hands it to a solver. Both are pure
functions of their arguments (the solver's state included: Richardson keeps the last outer step's
eigenvector to warm-start λ_max), so the J simulations of an outer step can be computed anywhere, in
any order.

Simulation health. A simulated fine-tuning that diverged says nothing about the fine-tuning a user
will run, and one such sample can swamp the mean of Alg. 2 line 10. :func:`check_health` raises
:class:`~resalign.errors.SimulationDiverged` (a :class:`SolverError`: the meta loop drops the sample
with its reason) when θ_FT, a fine-tuning loss or L_harm(θ_FT) is not finite, or when L_FT on the
simulation's own data (fixed noise) grew by more than ``max_ft_loss_growth`` over the run: fine-tuning
that raises its own loss has left the region where Eq. 5 describes it.
"""

from __future__ import annotations

import math
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
    needs,
)
from resalign import seeds
from resalign.core import tree
from resalign.core.curvature import make_curvature
from resalign.core.functional import second_order
from resalign.core.trajectory import replay_adapt
from resalign.errors import SimulationDiverged

#: Default bound on L_FT(θ_FT) / L_FT(θ) on the simulation's data before a simulation counts as diverged.
MAX_FT_LOSS_GROWTH = 2.0


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

    def __init__(self, ctx: DiffusionContext, loss: FinetuneLoss, data: DenoiseBatch, batch_size: int, seed: int,
                 curvature_samples: int = 0):
        self.ctx, self.loss, self.data, self.batch_size, self.seed = ctx, loss, data, batch_size, seed
        self.curvature_samples = curvature_samples
        self.step = 0

    def fresh(self) -> FinetuneObjective:
        return FinetuneObjective(self.ctx, self.loss, self.data, self.batch_size, self.seed, self.curvature_samples)

    def __call__(self, params: Params) -> torch.Tensor:
        n = self.data.x0.shape[0]
        idx = (torch.arange(self.batch_size) + self.step * self.batch_size) % n
        gen = seeds.generator(self.seed, "ft-noise", self.step)
        self.step += 1
        return self.loss(self.ctx, params, _take(self.data, idx), gen)

    def full(self, params: Params, ctx: DiffusionContext | None = None) -> torch.Tensor:
        return self.loss(ctx or self.ctx, params, self.data, seeds.generator(self.seed, "hvp-noise"))

    def curvature_loss(self, params: Params, ctx: DiffusionContext | None = None) -> torch.Tensor:
        """The L_FT whose curvature enters Eq. 6: :meth:`full`, or L_FT on the first
        ``curvature_samples`` pairs of D_FT (same fixed-noise rule) when that is set and smaller."""
        n = self.data.x0.shape[0]
        if not 0 < self.curvature_samples < n:
            return self.full(params, ctx)
        part = _take(self.data, torch.arange(self.curvature_samples))
        return self.loss(ctx or self.ctx, params, part, seeds.generator(self.seed, "hvp-noise"))


def check_health(losses: list[float], theta_ft: Params, ft_before: float, ft_after: float, harm_ft: float,
                 max_growth: float | None) -> None:
    """Raise :class:`SimulationDiverged` when the simulated fine-tuning diverged (module docstring)."""
    if not all(map(math.isfinite, losses)):
        raise SimulationDiverged("simulated fine-tuning diverged: a fine-tuning loss is not finite")
    if not tree.all_finite(theta_ft):
        raise SimulationDiverged("simulated fine-tuning diverged: θ_FT is not finite")
    if not math.isfinite(harm_ft):
        raise SimulationDiverged("simulated fine-tuning diverged: L_harm(θ_FT) is not finite")
    if not math.isfinite(ft_after):
        raise SimulationDiverged("simulated fine-tuning diverged: L_FT(θ_FT) is not finite")
    if max_growth is not None and ft_before > 0 and ft_after > max_growth * ft_before:
        raise SimulationDiverged(f"simulated fine-tuning diverged: L_FT grew {ft_after / ft_before:.3g}x "
                                 f"({ft_before:.4g} -> {ft_after:.4g}; bound {max_growth:g}x)")


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
    curvature: str = "hessian",
    with_unroll: bool = True,
    cache: dict[str, Any] | None = None,
    max_ft_loss_growth: float | None = MAX_FT_LOSS_GROWTH,
    curvature_samples: int = 0,
    harm_noise: tuple | None = None,
) -> tuple[HypergradProblem, dict[str, Any]]:
    """The hypergradient problem of one sampled configuration C at θ (W-space parameters).

    Returns the problem and what was measured on the way (adaptation losses, L_FT on the simulation's
    data before and after, L_harm(θ_FT)). Raises :class:`SimulationDiverged` for a diverged simulation
    (:func:`check_health`; ``max_ft_loss_growth = None`` keeps only the finiteness checks).
    ``curvature_samples`` > 0 evaluates the curvature on that many pairs of D_FT
    (:meth:`FinetuneObjective.curvature_loss`): the graph every product reuses, and each product's
    cost, shrink in proportion. ``harm_noise`` (seed parts) draws L_harm's timesteps and noise as the
    caller's L_harm(θ) does (common random numbers); None: the simulation's own.
    """
    theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    objective = FinetuneObjective(ctx, finetune_loss, data.ft, config.batch_size, seed, curvature_samples)
    adapted = adapter.adapt(theta, objective, config, differentiable=False,
                            generator=seeds.generator(seed, "adapt-init"))
    theta_ft = tree.detach(adapted.theta_ft)
    with torch.no_grad():
        ft_before = float(objective.full(tree.detach(theta)))
        ft_after = float(objective.full(theta_ft)) if tree.all_finite(theta_ft) else float("nan")

    def harm_loss(p: Params) -> torch.Tensor:
        gen = seeds.generator(*harm_noise) if harm_noise is not None else seeds.generator(seed, "harm-noise")
        return harmful_loss(ctx, p, data.harm, gen)

    at_ft = {k: v.detach().requires_grad_(True) for k, v in theta_ft.items()}
    loss_ft = harm_loss(at_ft)
    check_health(adapted.losses, theta_ft, ft_before, ft_after, float(loss_ft.detach()), max_ft_loss_growth)
    grad_harm = tree.grads_or_zeros(torch.autograd.grad(loss_ft, list(at_ft.values()), allow_unused=True), at_ft)

    hvp_holder: list = []

    def hvp_ft(v: Params) -> Params:
        if not hvp_holder:
            hvp_holder.append(make_curvature(curvature, ctx, lambda c, p: objective.curvature_loss(p, c), theta_ft))
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
        curvature=curvature,
        unroll=unroll if with_unroll else None,
        harm_loss=harm_loss,
        cache=cache if cache is not None else {},
        replay=lambda visit: replay_adapt(adapter, theta, objective.fresh(), config, visit, seeds.generator(seed, "adapt-init")),
    )
    info = {
        "config": config.label(),
        "adapt_loss_first": adapted.losses[0] if adapted.losses else None,
        "adapt_loss_last": adapted.losses[-1] if adapted.losses else None,
        "harm_ft": float(loss_ft.detach()),
        "ft_loss_before": ft_before,
        "ft_loss_after": ft_after,
        "delta_norm": tree.norm(tree.add(theta_ft, tree.detach(theta), -1.0)),
    }
    return problem, info


def simulate(
    ctx: DiffusionContext,
    theta: Params,
    config: FinetuneConfig,
    data: SimulationData,
    *,
    solver: Solver,
    **problem: Any,
) -> tuple[Params, dict[str, Any]]:
    """(θ, C, D_FT, seed) ↦ the hypergradient ∇_θ L_harm(θ_FT) estimated by ``solver``, and diagnostics.

    ``problem`` holds the keywords of :func:`build_hypergrad_problem` (``adapter``, ``finetune_loss``,
    ``harmful_loss``, ``seed``, ``gamma``, ...) but ``with_unroll``: the unrolled recomputation is
    built when ``solver`` needs the trajectory.
    """
    built, info = build_hypergrad_problem(ctx, theta, config, data, with_unroll=needs(solver, "trajectory"), **problem)
    result = solver.solve(built)
    info.update(result.diagnostics)
    info["hypergrad_norm"] = tree.norm(result.hypergrad)
    return tree.detach(result.hypergrad), info
