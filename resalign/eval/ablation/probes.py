"""Direction probes: which estimator of Eq. 3's gradient carries resilience, measured cheaply.

At a model θ (a run's checkpoint), each candidate direction d of the outer step is tried as a small
step θ' = θ + ε·d/‖d‖ followed by the downstream attack (the preset's benign fine-tuning), and the
harmful loss after the attack is compared with the attack of θ itself under the same attack seed
(paired: the same batches, timesteps and noise). No image is generated, so a probe costs a few
dozen fine-tunings. The candidates (:data:`DIRECTIONS`):

* ``resalign``: −G of Alg. 2 with β (the run's, or ``beta`` when the run is a β = 0 twin);
* ``twin``: −G with β = 0 (Eq. 2: plain unlearning with the same α, data and seed);
* ``harm``: −∇L_harm(θ) alone;
* ``h:SOLVER``: −(1/J) Σ_j h_j, the hypergradient term alone, estimated by a registered solver;
* ``random``: a Gaussian direction (the noise floor of the probe).

Every figure is in θ-space (the parameters the run unlearns). ``pre`` is the change of L_harm on
the evaluation batch right after the step, ``post`` after the attack: a direction that carries
resilience lowers ``post`` by more than its ``pre`` alone would survive.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from resalign.components import Params
from resalign import seeds
from resalign.core import tree
from resalign.errors import ConfigError
from resalign.eval.reports.stats import paired_difference

DIRECTIONS = ("resalign", "twin", "harm", "h:richardson", "h:first-order", "random")


@dataclass
class ProbeSettings:
    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    step_sizes: list[float] = field(default_factory=lambda: [0.3])
    attack_seeds: int = 3
    #: simulations per hypergradient estimate (the run's J when 0)
    J: int = 4
    #: β of the ``resalign`` direction when the run's own β is 0
    beta: float = 0.8
    eval_pairs: int = 32
    seed: int = 0


def check_directions(names: Sequence[str], solvers: Sequence[str]) -> None:
    for name in names:
        if name.startswith("h:"):
            if name[2:] not in solvers:
                raise ConfigError(f"--directions {name!r}: no solver {name[2:]!r}; expected one of {', '.join(solvers)}")
        elif name not in DIRECTIONS:
            raise ConfigError(f"--directions {name!r}: expected one of {', '.join(DIRECTIONS)} or h:SOLVER")


def _theta_grad(trainer: Any, scalar: torch.Tensor) -> Params:
    """∇_θ of ``scalar`` at the trainer's θ (zeros where it does not depend on an entry)."""
    names = list(trainer.theta)
    raw = torch.autograd.grad(scalar, [trainer.theta[k] for k in names], allow_unused=True)
    return {k: (g.detach() if g is not None else torch.zeros_like(trainer.theta[k])) for k, g in zip(names, raw)}


def _harm(trainer: Any) -> tuple[Params, Any, torch.Tensor]:
    """W(θ), the outer step's harmful batch and L_harm(θ) on it, drawn as :meth:`ResAlign.gradient` draws them."""
    s = trainer.settings
    weights = trainer.param.weights(trainer.theta)
    harm = trainer.data.harmful.sample(s.harm_batch, seeds.generator(s.seed, trainer.step, "harm-data"))
    loss = trainer.harmful_loss(trainer.ctx, weights, harm, seeds.generator(s.seed, trainer.step, "harm-noise"))
    return weights, harm, loss


def directions(trainer: Any, names: Sequence[str], settings: ProbeSettings, registry) -> dict[str, Params]:
    """The descent directions (−gradient) of ``names`` at ``trainer``'s θ, in θ-space."""
    s0 = trainer.settings
    J = settings.J or s0.J
    beta = s0.beta if s0.beta > 0 else settings.beta
    out: dict[str, Params] = {}
    solver0 = trainer.solver
    try:
        for name in names:
            if name in ("resalign", "twin"):
                trainer.settings = dataclasses.replace(s0, beta=beta if name == "resalign" else 0.0, J=J)
                grads, _ = trainer.gradient()
                out[name] = tree.scale(grads, -1.0)
            elif name == "harm":
                out[name] = tree.scale(_theta_grad(trainer, _harm(trainer)[2]), -1.0)
            elif name.startswith("h:"):
                trainer.settings = dataclasses.replace(s0, J=J)
                trainer.solver = registry.create("solver", name[2:], {})
                weights, harm, loss = _harm(trainer)
                h = trainer.hypergradient(trainer.step, weights, harm, float(loss.detach()), [])
                if h is None:
                    raise ConfigError(f"direction {name}: every simulation was dropped")
                out[name] = tree.scale(_theta_grad(trainer, tree.dot(weights, h)), -1.0)
            elif name == "random":
                g = seeds.generator(settings.seed, "probe", "random")
                out[name] = {k: torch.randn(v.shape, generator=g).to(v) for k, v in trainer.theta.items()}
    finally:
        trainer.settings, trainer.solver = s0, solver0
    return out


def cosines(dirs: dict[str, Params]) -> dict[tuple[str, str], float]:
    names = list(dirs)
    return {(a, b): tree.dot(dirs[a], dirs[b]).item() / (tree.norm(dirs[a]) * tree.norm(dirs[b]) + 1e-30)
            for i, a in enumerate(names) for b in names[i + 1:]}


@dataclass
class ProbeResult:
    direction: str
    step_size: float
    norm: float
    pre: list[float]  # per attack seed: L_harm(θ') − L_harm(θ) before the attack (the same value each seed)
    post: list[float]  # per attack seed: L_harm after attacking θ' − after attacking θ

    def row(self) -> dict[str, Any]:
        d = paired_difference(self.post, [0.0] * len(self.post))
        return {"direction": self.direction, "step_size": self.step_size, "norm": self.norm,
                "pre": self.pre[0] if self.pre else float("nan"), "post_mean": d.mean, "post_sem": d.sem,
                "post_ci_low": d.ci_low, "post_ci_high": d.ci_high, "n": d.n, "post_values": list(self.post)}


def probe(trainer: Any, dirs: dict[str, Params], settings: ProbeSettings,
          attack: Callable[[Params, int], Params], evaluate: Callable[[Params], float],
          progress: Callable[[str, int, int], None] | None = None) -> tuple[list[ProbeResult], dict[str, Any]]:
    """Step along each direction, attack, and compare with the attack of θ itself (module docstring).

    ``attack(W, seed)`` returns the attacked UNet weights, ``evaluate(W)`` the harmful loss on the fixed
    evaluation batch; both are the caller's (the attack preset and loss of the run).
    """
    theta = tree.detach(trainer.theta)
    w0 = trainer.param.merged(theta)
    seeds_ = list(range(settings.attack_seeds))
    total = len(seeds_) * (1 + len(dirs) * len(settings.step_sizes))
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done, total)

    base_pre = evaluate(w0)
    base_post = []
    for s in seeds_:
        base_post.append(evaluate(attack(w0, s)))
        tick("attack θ")
    results = []
    for name, d in dirs.items():
        norm = tree.norm(d)
        unit = tree.scale(d, 1.0 / (norm + 1e-30))
        for eps in settings.step_sizes:
            stepped = {k: v + eps * unit[k] for k, v in theta.items()}
            w = trainer.param.merged(stepped)
            pre = evaluate(w) - base_pre
            post = []
            for s, b in zip(seeds_, base_post):
                post.append(evaluate(attack(w, s)) - b)
                tick(f"attack {name} ε={eps:g}")
            results.append(ProbeResult(name, eps, norm, [pre] * len(seeds_), post))
    return results, {"harm": base_pre, "harm_attacked": base_post}


def copy_bundle(bundle: Any) -> Any:
    """A bundle whose UNet weights the probe may overwrite."""
    out = copy.copy(bundle)
    out.unet = copy.deepcopy(bundle.unet)
    return out
