"""The validation meta-objective: Eq. 3's last term on simulations the outer loop never trains on.

Eq. 3 penalises E_{C ~ π(C), D_FT ~ D}[L_harm(ADAPT(θ, D_FT, C))], and Alg. 2 descends a J-sample
estimate of it; whether θ actually moves towards lower harm *after* fine-tuning is a question of
measurement, not of the training curve (the training simulations are fitted to). A
:class:`ValidationSet` is V fixed simulated fine-tunings, drawn once from the same pool π(C) with seeds
of their own, on D_FT pairs held out of the fine-tuning pool (:func:`hold_out`: the training draws
never see them), measured at θ every few outer steps:

* ``harm``: L_harm(θ) on a fixed harmful batch with fixed noise;
* ``harm_ft``: the mean over v of L_harm(θ_FT^v) on the *same* pairs, timesteps and noise (common
  random numbers: the rebound L_harm(θ_FT^v) − L_harm(θ) is exactly 0 when θ_FT^v = θ, so the
  difference is not two independent noisy estimates);
* ``rebound``: the mean of L_harm(θ_FT^v) − L_harm(θ), what fine-tuning gave back;
* ``mse`` / ``mse_ft``: the plain denoising error on the harmful pairs before and after (one scale
  for every harmful loss; higher: the concept is less reproduced);
* ``ft_before`` / ``ft_after``: L_FT on each validation D_FT before and after its own fine-tuning,
  so a validation simulation that did not fine-tune is visible.

The set is a pure function of the run's seed and θ: a resumed run and every ``torchrun`` rank measure
the same values (the V simulations are split over the ranks like the J of a step and gathered).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from resalign.components import DenoiseBatch, FinetuneConfig, Params, needs
from resalign import seeds
from resalign.core import tree
from resalign.core.problem import FinetuneObjective
from resalign.errors import ConfigError

#: The seed tag of everything a validation simulation draws; training draws never use it.
TAG = "validation"


def subset(pairs: Any, idx: torch.Tensor) -> Any:
    """The pairs of ``pairs`` (a PairSet) at ``idx``, as a PairSet of the same type."""
    dev = pairs.x0.device
    return type(pairs)(
        x0=pairs.x0[idx.to(dev)], cond=pairs.cond[idx.to(pairs.cond.device)],
        prompts=[pairs.prompts[i] for i in idx.tolist()],
        anchor_cond=pairs.anchor_cond[idx.to(dev)] if pairs.anchor_cond is not None else None,
    )


def hold_out(pairs: Any, n: int, seed: int) -> tuple[Any, Any]:
    """(training pairs, held-out pairs): ``n`` pairs of the D_FT pool, chosen by ``seed``, that the
    training simulations never draw; at most a quarter of the pool (at least one pair) is held out."""
    m = len(pairs)
    if m < 2:
        raise ConfigError(f"val_sims: the D_FT pool has {m} pair(s); holding validation pairs out needs at least 2 "
                          "(give data.finetune more pairs or set val_sims = 0)")
    n = max(1, min(int(n), m // 4))
    perm = torch.randperm(m, generator=seeds.generator(seed, TAG, "hold-out"))
    val_idx, train_idx = perm[:n].sort().values, perm[n:].sort().values
    return subset(pairs, train_idx), subset(pairs, val_idx)


@dataclass
class ValidationSimulation:
    """One fixed validation simulation: its configuration C^v and fine-tuning data D_FT^v."""

    v: int
    config: FinetuneConfig
    ft: DenoiseBatch
    seed: int


class ValidationSet:
    """V fixed simulated fine-tunings measured at θ (module docstring).

    ``trainer`` is the :class:`~resalign.core.meta.ResAlign` whose components (ADAPT methods and
    fine-tuning losses by configuration, harmful loss, data, pool, split) the set uses; ``held_out``
    the D_FT pairs :func:`hold_out` kept from training.
    """

    def __init__(self, trainer: Any, held_out: Any, count: int):
        s = trainer.settings
        self.trainer, self.count = trainer, int(count)
        self.harm = trainer.data.harmful.sample(s.harm_batch, seeds.generator(s.seed, TAG, "harm-data"))
        self.sims: list[ValidationSimulation] = []
        for v in range(self.count):
            config = trainer.pool.sample(seeds.rng(s.seed, TAG, v, "config"))
            ft = held_out.sample(s.ft_size, seeds.generator(s.seed, TAG, v, "ft-data"))
            if needs(trainer.finetune_loss(config), "prior"):
                ft.prior = trainer.data.preserve.sample(s.ft_size, seeds.generator(s.seed, TAG, v, "prior-data"))
            self.sims.append(ValidationSimulation(v, config, ft, seeds.derive(s.seed, TAG, v, "simulation")))
        self._denoise = None

    def _noise(self) -> torch.Generator:
        return seeds.generator(self.trainer.settings.seed, TAG, "harm-noise")

    def _mse(self, params: Params) -> float:
        if self._denoise is None:
            self._denoise = self.trainer.registry.create("finetune-loss", "denoise", {})
        return float(self._denoise(self.trainer.ctx, params, self.harm, self._noise()))

    def _one(self, sim: ValidationSimulation, weights: Params) -> dict[str, Any]:
        tr = self.trainer
        ctx, config = tr.ctx, sim.config
        objective = FinetuneObjective(ctx, tr.finetune_loss(config), sim.ft, config.batch_size, sim.seed)
        theta = {k: v.detach().requires_grad_(True) for k, v in weights.items()}
        adapted = tr.adapter(config).adapt(theta, objective, config, differentiable=False,
                                           generator=seeds.generator(sim.seed, "adapt-init"))
        theta_ft = tree.detach(adapted.theta_ft)
        with torch.no_grad():
            out = {"v": sim.v, "config": config.label(), "ft_before": float(objective.full(weights)),
                   "ft_after": float(objective.full(theta_ft)),
                   "harm_ft": float(tr.harmful_loss(ctx, theta_ft, self.harm, self._noise())),
                   "mse_ft": self._mse(theta_ft)}
        out["diverged"] = not all(map(math.isfinite, (out["ft_after"], out["harm_ft"])))
        return out

    def measure(self, weights: Params, step: int) -> dict[str, Any]:
        """The validation meta-objective at W(θ) (``weights``), after outer step ``step``."""
        t0 = time.perf_counter()
        tr = self.trainer
        weights = tree.detach(weights)
        with torch.no_grad():
            harm = float(tr.harmful_loss(tr.ctx, weights, self.harm, self._noise()))
            mse = self._mse(weights)
        costs = [tr.simulation_cost(sim.config) for sim in self.sims]
        _, order = tr.split.assign(costs)
        mine = [(v, self._one(self.sims[v], weights)) for v in order]
        each = [info for _, info in sorted((p for part in tr.split.gather(mine) for p in part), key=lambda p: p[0])]
        ok = [e for e in each if not e["diverged"]]
        harm_ft = [e["harm_ft"] for e in ok]
        return {
            "step": step,
            "harm": harm,
            "harm_ft": float(np.mean(harm_ft)) if ok else float("nan"),
            "rebound": float(np.mean([h - harm for h in harm_ft])) if ok else float("nan"),
            "mse": mse,
            "mse_ft": float(np.mean([e["mse_ft"] for e in ok])) if ok else float("nan"),
            "ft_before": float(np.mean([e["ft_before"] for e in each])),
            "ft_after": float(np.mean([e["ft_after"] for e in ok])) if ok else float("nan"),
            "diverged": len(each) - len(ok),
            "simulations": each,
            "time_s": time.perf_counter() - t0,
        }


#: The figures of a validation measurement that :func:`curve` keeps.
CURVE_KEYS = ("harm", "harm_ft", "rebound", "mse", "mse_ft", "ft_before", "ft_after")


def curve(rows: Any) -> list[dict[str, float]]:
    """The validation meta-objective over the outer steps of a run, from its ``metrics.jsonl`` rows
    (step 0 is θ before the first update)."""
    out = []
    for r in rows:
        for key in ("validation_initial", "validation"):
            v = r.get(key)
            if v:
                out.append({"step": int(v["step"]), **{k: float(v[k]) for k in CURVE_KEYS}})
    return sorted({p["step"]: p for p in out}.values(), key=lambda p: p["step"])


def run_curve(run_dir: Any) -> list[dict[str, float]]:
    """:func:`curve` of the run directory ``run_dir`` (its ``metrics.jsonl``)."""
    from resalign.rundir import read_metrics

    return curve(read_metrics(run_dir))
