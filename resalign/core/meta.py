"""Alg. 2: the ResAlign outer loop's step, over a pool π(C) of fine-tuning configurations.

Each outer step i computes, at θ_i (Eq. 4 with the meta-learned last term),

    G_i = (1 − β) ∇L_harm(θ_i) + α_i ∇R(θ_i) + (β / J) Σ_j ∇_θ L_harm(θ_FT,j),
    θ_FT,j = ADAPT(θ_i, D_FT,j, C_j),   C_j ~ π(C),   D_FT,j ~ D,

clips it and takes one step of the outer optimizer (AdamW, as in the authors' code). β = 0 gives the
plain unlearning objective (Eq. 2) with everything else identical. The hypergradients are computed
in the UNet weight space W and pulled back to θ by one vector-Jacobian product of W(θ).

Only sound simulations enter the mean of line 10. A simulation is dropped, with its reason in the
step's metrics, when its fine-tuning diverged (:func:`resalign.core.problem.check_health`: non-finite
values, or L_FT grown past ``max_ft_loss_growth``) or when the solver failed. A large rebound is *kept*:
it is exactly what Eq. 3 penalises. (``outlier_factor`` > 0 restores the former rule, dropping
|L_harm(θ_FT,j)| above that many times the median of |L_harm(θ_i)| and the step's |L_harm(θ_FT,j')|.)
The mean is over the simulations kept.

``common_noise``: L_harm(θ_FT,j) of every simulation is taken on the outer step's harmful pairs,
timesteps and noise, those of L_harm(θ_i) (common random numbers), so the rebound
L_harm(θ_FT,j) − L_harm(θ_i) carries no sampling noise of its own. ``fixed_noise`` draws those
timesteps and noise once for the whole run (the same at every outer step). ``val_sims`` > 0 holds ``val_pairs``
pairs out of the D_FT pool and measures the validation meta-objective on them every ``val_every``
outer steps (:mod:`resalign.core.heldout`).

The simulations may be divided between processes (:mod:`resalign.core.split`): each computes its
share, all J diagnostics are gathered so every process drops the same ones, and the kept
hypergradients are summed over the processes; every process then takes the same step.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resalign.components import (  # PairSet, TrainingData: re-exported, they lived here
    DenoiseBatch,
    DiffusionContext,
    FinetuneConfig,
    PairSet,  # noqa: F401 (re-exported)
    Params,
    TrainingData,
    finetune_loss_of,
    needs,
)
from resalign import seeds
from resalign.core import tree
from resalign.core.health import outlier_mask
from resalign.core.params import Parameterization
from resalign.core.problem import MAX_FT_LOSS_GROWTH, SimulationData, simulate
from resalign.core.split import ONE_PROCESS, SimulationSplit, StepCache, source_of
from resalign.errors import ConfigError, SolverError


@dataclass
class ConfigPool:
    """π(C): every combination of the lists below, minus the unstable ones (Sec. 4.1).

    The exclusion rule drops configurations whose ``lr × steps`` exceeds ``max_lr_steps`` (large
    learning rates combined with many steps; 0 disables it); ``lrs_by_optimizer`` gives an optimizer its own learning
    rates (plain SGD needs larger ones than Adam to move a model as far).
    """

    lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-5, 1e-6])
    steps: list[int] = field(default_factory=lambda: [5, 10, 20, 30])
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "adam"])
    finetune_losses: list[str] = field(default_factory=lambda: ["denoise", "prior_preservation"])
    adapters: list[str] = field(default_factory=lambda: ["full", "lora"])
    batch_size: int = 1
    lrs_by_optimizer: dict[str, list[float]] = field(default_factory=dict)
    max_lr_steps: float = 1e-3  # 0: no exclusion
    #: options per ADAPT method, e.g. {lora = {rank = 4}}
    adapter_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def configs(self) -> list[FinetuneConfig]:
        out = []
        for opt, loss, adapter, steps in itertools.product(self.optimizers, self.finetune_losses, self.adapters,
                                                           self.steps):
            for lr in self.lrs_by_optimizer.get(opt, self.lrs):
                if self.max_lr_steps > 0 and lr * steps > self.max_lr_steps * (1 + 1e-9):
                    continue
                out.append(FinetuneConfig(adapter=adapter, lr=float(lr), steps=int(steps), optimizer=opt,
                                          finetune_loss=loss, batch_size=self.batch_size,
                                          adapter_options=dict(self.adapter_options.get(adapter, {}))))
        if not out:
            raise ConfigError("pool: every configuration is excluded (check lrs, steps and max_lr_steps)")
        return out

    def sample(self, rng: np.random.Generator) -> FinetuneConfig:
        configs = self.configs()
        return configs[int(rng.integers(len(configs)))]


#: How the γ of Eq. 5 is set per simulation (:meth:`MethodSettings.proximity`).
GAMMA_RULES = ("fixed", "reach")


@dataclass
class MethodSettings:
    """The scalars of Alg. 2."""

    beta: float = 0.8
    alpha: float = 1.0
    #: constant | sigmoid (to alpha_end, centred at 50 %) | late-sigmoid (the authors' ramp: from 50 % of
    #: training, centred at 75 %)
    alpha_schedule: str = "constant"
    alpha_end: float | None = None
    J: int = 2
    gamma: float = 1.0
    outer_steps: int = 30
    outer_lr: float = 2e-4
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    harm_batch: int = 8
    preserve_batch: int = 8
    ft_size: int = 4
    seed: int = 0
    #: draw D_FT once and reuse it in every simulation (no meta-learning over data, Tab. 6)
    fixed_ft_data: bool = False
    #: curvature operator of Eq. 6 handed to the solvers: hessian | gauss-newton (resalign.core.curvature)
    curvature: str = "hessian"
    #: γ of each simulation: "fixed" (γ = gamma, the paper) or "reach" (γ = gamma · T · lr, see proximity())
    gamma_rule: str = "fixed"
    #: pairs of D_FT whose L_FT defines the curvature of Eq. 6 (0: all ft_size of them)
    curvature_samples: int = 0
    #: a simulation whose L_FT grew by more than this factor diverged (None: only finiteness checks)
    max_ft_loss_growth: float | None = MAX_FT_LOSS_GROWTH
    #: drop a simulation whose |L_harm(θ_FT)| exceeds this many times its outer step's median (0: off,
    #: only a diverged fine-tuning is dropped)
    outlier_factor: float = 0.0
    #: L_harm(θ_FT,j) on the outer step's harmful pairs and noise (common random numbers)
    common_noise: bool = False
    #: L_harm(θ_i)'s diffusion timesteps and noise (and, with common_noise, the simulations') the same
    #: at every outer step instead of drawn anew (fixed timesteps, as Meta-Unlearning)
    fixed_noise: bool = False
    #: validation simulations of the meta-objective (0: none), measured every val_every outer steps on
    #: val_pairs D_FT pairs held out of training (resalign.core.heldout)
    val_sims: int = 0
    val_every: int = 5
    val_pairs: int = 16
    #: the authors' safeguard: a simulation whose solve halved its step k times enters the mean with
    #: weight 2^-k (only its β part shrinks), and one that fell back to first-order is dropped
    halving_shrinks_beta: bool = False
    #: keep the outer AdamW moments (two copies of W) in host memory between updates, so that the
    #: simulations of an outer step have the accelerator's memory without them
    offload_outer_state: bool = False

    def proximity(self, config: FinetuneConfig) -> float:
        """γ of Eq. 5 for one simulated fine-tuning C.

        ``fixed``: the run's γ (the paper's γ = 1). ``reach``: γ · T · lr, the proximity whose Moreau
        envelope has the same Jacobian as T steps of gradient descent at learning rate lr to first
        order in lr·H: (I + T·lr·H)⁻¹ = (I − lr·H)^T + O((lr·H)²). A fine-tuning that moves θ little
        (small lr·T) then gets a hypergradient close to first-order, as its exact one is.
        """
        if self.gamma_rule == "fixed":
            return self.gamma
        if self.gamma_rule == "reach":
            return self.gamma * config.steps * config.lr
        raise ConfigError(f"gamma_rule {self.gamma_rule!r}: expected one of {', '.join(GAMMA_RULES)}")

    def alpha_at(self, step: int) -> float:
        if self.alpha_schedule == "constant" or self.alpha_end is None:
            return self.alpha
        p = step / max(self.outer_steps, 1)
        if self.alpha_schedule == "sigmoid":
            s = 1.0 / (1.0 + math.exp(-10.0 * (p - 0.5)))
            return self.alpha + (self.alpha_end - self.alpha) * s
        if self.alpha_schedule == "late-sigmoid":
            s = 0.0 if p < 0.5 else 1.0 / (1.0 + math.exp(-20.0 * (p - 0.75)))
            return self.alpha + (self.alpha_end - self.alpha) * s
        raise ConfigError(f"alpha_schedule {self.alpha_schedule!r}: expected constant, sigmoid or late-sigmoid")


def _move_optimizer_state(optimizer: torch.optim.Optimizer, to_host: bool) -> None:
    """The outer optimizer's moments to host memory (between updates) or back to their parameters'
    device (for the update); the step counters stay where torch keeps them."""
    for p, state in optimizer.state.items():
        for key, t in state.items():
            if torch.is_tensor(t) and key != "step":
                state[key] = tree.host_tensor(t) if to_host else t.to(p.device)


class ResAlign:
    """The state and one outer step of Alg. 2.

    ``registry`` provides ADAPT methods and fine-tuning losses by name (``create(kind, name, options)``);
    ``split`` says which simulations j this process computes and how the processes combine them.
    """

    def __init__(
        self,
        ctx: DiffusionContext,
        parameterization: Parameterization,
        *,
        harmful_loss,
        regularizer,
        solver,
        pool: ConfigPool,
        data: TrainingData,
        settings: MethodSettings,
        registry,
        split: SimulationSplit = ONE_PROCESS,
    ):
        self.ctx, self.param, self.data, self.settings = ctx, parameterization, data, settings
        self.harmful_loss, self.regularizer, self.solver, self.pool = harmful_loss, regularizer, solver, pool
        self.registry, self.split = registry, split
        self.validation = None
        self.theta: Params = {k: v.requires_grad_(True) for k, v in parameterization.init().items()}
        # foreach=False: one tensor at a time, so the update needs no temporary copy of all of W
        self.optimizer = torch.optim.AdamW(list(self.theta.values()), lr=settings.outer_lr,
                                           weight_decay=settings.weight_decay, foreach=False)
        self.step = 0
        self._components: dict[tuple, Any] = {}
        if settings.beta > 0 and settings.J > 0:
            pool.configs()  # fail early on an empty pool
            for c in pool.configs():
                self.adapter(c), self.finetune_loss(c)
        if settings.val_sims > 0:
            from resalign.core.heldout import ValidationSet, hold_out

            train, held = hold_out(data.finetune, settings.val_pairs, settings.seed)
            self.data = TrainingData(harmful=data.harmful, preserve=data.preserve, finetune=train)
            self.validation = ValidationSet(self, held, settings.val_sims)

    # ------------------------------------------------------------------ components by name
    def adapter(self, c: FinetuneConfig):
        """The ADAPT method of configuration C (one instance per method and options)."""
        key = ("adapter", c.adapter, json.dumps(c.adapter_options, sort_keys=True))  # options may hold lists
        if key not in self._components:
            self._components[key] = self.registry.create("adapter", c.adapter, dict(c.adapter_options))
        return self._components[key]

    def finetune_loss(self, c: FinetuneConfig):
        """L_FT of configuration C: the one its ADAPT method prescribes (``finetune_loss`` class
        attribute, e.g. DreamBooth's prior preservation), else the configuration's."""
        name = finetune_loss_of(self.adapter(c), c.finetune_loss)
        key = ("finetune-loss", name)
        if key not in self._components:
            self._components[key] = self.registry.create("finetune-loss", name, {})
        return self._components[key]

    def simulation_cost(self, c: FinetuneConfig) -> float:
        """The predicted cost of simulating C, in denoising passes: T inner steps of its batch, twice
        with prior-preservation pairs; the solve's products are the same for every configuration."""
        return float(c.steps * c.batch_size * (2 if needs(self.finetune_loss(c), "prior") else 1))

    # ------------------------------------------------------------------ Alg. 2
    def simulation_data(self, step: int, j: int, config: FinetuneConfig, harm: DenoiseBatch) -> SimulationData:
        s = self.settings
        if s.fixed_ft_data:
            step, j = 0, 0
        ft = self.data.finetune.sample(s.ft_size, seeds.generator(s.seed, step, j, "ft-data"))
        if needs(self.finetune_loss(config), "prior"):
            ft.prior = self.data.preserve.sample(s.ft_size, seeds.generator(s.seed, step, j, "prior-data"))
        return SimulationData(ft=ft, harm=harm)

    def outer_step(self) -> dict[str, Any]:
        """One iteration of Alg. 2 (lines 4-11): update θ in place, return the step's metrics."""
        t0 = time.perf_counter()
        s, step = self.settings, self.step
        initial = None
        if self.validation is not None and step == 0:
            initial = self.validation.measure(self.param.weights(self.theta), 0)
        grads, metrics = self.gradient()
        grad_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        if not math.isfinite(grad_norm):
            raise SolverError(f"non-finite outer gradient at step {step + 1} (lower outer_lr or check the losses)")
        clip = 1.0
        if s.max_grad_norm is not None and grad_norm > s.max_grad_norm:
            clip = s.max_grad_norm / (grad_norm + 1e-12)
        for k, g in grads.items():
            self.theta[k].grad = g.mul_(clip)
        offload = s.offload_outer_state
        if offload:
            _move_optimizer_state(self.optimizer, to_host=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if offload:
            _move_optimizer_state(self.optimizer, to_host=True)
        self.step += 1
        metrics.update(grad_norm=grad_norm, clip_scale=clip, time_s=time.perf_counter() - t0)
        if initial is not None:
            metrics["validation_initial"] = initial
        if self.validation is not None and (self.step % max(s.val_every, 1) == 0 or self.step == s.outer_steps):
            metrics["validation"] = self.validation.measure(self.param.weights(self.theta), self.step)
        return metrics

    def gradient(self) -> tuple[Params, dict[str, Any]]:
        """G_i of Alg. 2 at the current θ (before clipping), with the step's metrics."""
        s, step = self.settings, self.step
        alpha = s.alpha_at(step)
        harm = self.data.harmful.sample(s.harm_batch, seeds.generator(s.seed, step, "harm-data"))
        pres = self.data.preserve.sample(s.preserve_batch, seeds.generator(s.seed, step, "preserve-data"))
        weights = self.param.weights(self.theta)
        noise_step = 0 if s.fixed_noise else step
        loss_harm = self.harmful_loss(self.ctx, weights, harm, seeds.generator(s.seed, noise_step, "harm-noise"))
        loss_reg = self.regularizer(self.ctx, weights, pres, seeds.generator(s.seed, step, "reg-noise"))
        total = (1 - s.beta) * loss_harm + alpha * loss_reg

        sims: list[dict[str, Any]] = []
        if s.beta > 0 and s.J > 0:
            hyper_mean = self.hypergradient(step, weights, harm, float(loss_harm.detach()), sims)
            if hyper_mean is not None:
                # (β/J) Σ_j ⟨W(θ), h_j⟩ has θ-gradient (∂W/∂θ)ᵀ (β/J) Σ_j h_j: the pull-back of Alg. 2 line 10
                total = total + s.beta * tree.dot(weights, hyper_mean).to(total.dtype)

        names = list(self.theta)
        raw = torch.autograd.grad(total, [self.theta[k] for k in names], allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(self.theta[k])) for k, g in zip(names, raw)}

        harm_ft = [d["harm_ft"] for d in sims if "dropped" not in d]
        metrics: dict[str, Any] = {
            "step": step + 1,
            "loss_harm": float(loss_harm.detach()),
            "loss_reg": float(loss_reg.detach()),
            "alpha": alpha,
            "beta": s.beta,
        }
        if sims:
            metrics["simulations"] = sims
            metrics["dropped"] = len(sims) - len(harm_ft)
        if harm_ft:
            metrics["harm_ft_mean"] = float(np.mean(harm_ft))
            # Eq. 3: L_harm(θ) + αR(θ) + β [mean_j L_harm(θ_FT,j) − L_harm(θ)]
            metrics["objective"] = metrics["loss_harm"] + alpha * metrics["loss_reg"] + s.beta * (
                metrics["harm_ft_mean"] - metrics["loss_harm"])
            metrics["hypergrad_norm"] = tree.norm(hyper_mean)
            metrics["hypergrad_norms"] = [d["hypergrad_norm"] for d in sims if "dropped" not in d]
        return grads, metrics

    def hypergradient(self, step: int, weights: Params, harm: DenoiseBatch, loss_harm: float,
                      sims: list[dict[str, Any]]) -> Params | None:
        """(1/J') Σ_j h_j over the J' simulations kept (Alg. 2 lines 5-10); appends each one's diagnostics.

        This process computes its share of the J simulations (``split.assign`` of their predicted
        costs, :meth:`simulation_cost`); the diagnostics of all J are gathered (in j order) before the
        outlier rule, and the kept h_j are summed over the processes.
        """
        s, split = self.settings, self.split
        w_detached = tree.detach(weights)
        mine: list[tuple[int, dict[str, Any]]] = []
        h_of: dict[int, Params] = {}
        configs = [self.pool.sample(seeds.rng(s.seed, step, j, "config")) for j in range(s.J)]
        costs = [self.simulation_cost(c) for c in configs]
        owners, order = split.assign(costs)
        source = source_of(costs)
        cache = StepCache(split, source=source, source_owner=owners[source])
        for j in order:
            config = configs[j]
            data = self.simulation_data(step, j, config, harm)
            t_sim = time.perf_counter()
            try:
                h, info = simulate(
                    self.ctx, w_detached, config, data, adapter=self.adapter(config),
                    finetune_loss=self.finetune_loss(config), harmful_loss=self.harmful_loss,
                    solver=self.solver, seed=seeds.derive(s.seed, step, j, "simulation"), gamma=s.proximity(config),
                    curvature=s.curvature, cache=cache.view(j), max_ft_loss_growth=s.max_ft_loss_growth,
                    curvature_samples=s.curvature_samples,
                    harm_noise=(s.seed, 0 if s.fixed_noise else step, "harm-noise") if s.common_noise else None,
                )
                if not tree.all_finite(h):
                    raise SolverError("non-finite hypergradient")
                if s.halving_shrinks_beta:
                    if info.get("fallback"):
                        raise SolverError("the fixed point failed its checks after every halving: β part dropped")
                    if info.get("halvings", 0):
                        h = tree.scale(h, 0.5 ** int(info["halvings"]))
                h_of[j] = tree.to_host(h)  # a finished h_j waits in host memory
            except SolverError as exc:
                info = {"config": config.label(), "dropped": str(exc)}
            cache.done(j)
            info["time_s"] = time.perf_counter() - t_sim
            mine.append((j, info))
        cache.close()
        infos = sorted((pair for part in split.gather(mine) for pair in part), key=lambda pair: pair[0])
        sims.extend(info for _, info in infos)
        solved = [(j, info) for j, info in infos if "dropped" not in info]
        flags = outlier_mask(loss_harm, [info["harm_ft"] for _, info in solved], s.outlier_factor)
        for (_, info), outlier in zip(solved, flags):
            if outlier:
                info["dropped"] = (f"outlier: |L_harm(θ_FT)| = {abs(info['harm_ft']):.4g} exceeds {s.outlier_factor:g}x "
                                   "the median of its outer step")
        kept = [j for (j, _), outlier in zip(solved, flags) if not outlier]
        if not kept:
            return None
        device = next(iter(w_detached.values())).device
        total = tree.zeros_like(w_detached)
        for j in kept:
            if j in h_of:  # this process's share; host-held h_j summed in place on the device
                for k, v in total.items():
                    v.add_(h_of[j][k].to(device))
        split.sum_(list(total.values()))
        for v in total.values():
            v.mul_(1.0 / len(kept))
        return total

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """θ, the outer optimizer's state and the solver's (e.g. Richardson's warm-start eigenvectors)."""
        solver = self.solver.state_dict() if hasattr(self.solver, "state_dict") else {}
        return {"step": self.step, "theta": tree.detach(self.theta), "optimizer": self.optimizer.state_dict(),
                "solver": solver}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state["theta"].items():
                if k not in self.theta:
                    raise ConfigError(f"checkpoint has parameter {k!r} that this run does not unlearn")
                self.theta[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.settings.offload_outer_state:
            _move_optimizer_state(self.optimizer, to_host=True)
        if hasattr(self.solver, "load_state_dict"):
            self.solver.load_state_dict(state.get("solver", {}))
        self.step = int(state["step"])

    def unlearned_weights(self) -> Params:
        """W(θ) now: the unlearned UNet's state dict."""
        return self.param.merged(self.theta)
