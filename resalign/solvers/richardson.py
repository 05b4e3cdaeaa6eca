"""Richardson iteration for the Moreau-envelope linear system (Alg. 1, Eq. 6/7).

The hypergradient x = ∇_θ L_harm(θ_FT) solves A x = b with A = ∇²L_FT(θ_FT) + I/γ and b = g/γ (Eq. 6),
i.e. x = (I + γH)⁻¹ g. Richardson's iteration, from x_0 = 0, is

    x_{k+1} = x_k + ω (b − A x_k),          k = 0 … K−1,

each step one Hessian-vector product (the first is free since x_0 = 0). With ω = γ it reads
x_{k+1} = g − γH x_k, whose K-th iterate is the truncated Neumann series Σ_{k<K} (−γH)^k g; with
ω = γ = 1 it is the paper's Eq. 7.

Convergence. The error e_k = x_k − x* obeys e_{k+1} = (I − ωA) e_k, so the iteration converges iff
|1 − ω(1/γ + λ)| < 1 for every eigenvalue λ of H, i.e.

    0 < ω (1/γ + λ) < 2   for all λ   ⟺   λ_min > −1/γ   and   ω < 2γ / (1 + γ λ_max).

With ω = γ = 1 this fails as soon as λ_max > 1 (the toy model has λ_max ≈ 60). Shrinking γ instead
makes (I + γH)⁻¹ ≈ I, i.e. first-order. The default therefore keeps γ and relaxes ω:
λ_max is estimated by a few power iterations (HVPs; cached in ``problem.cache`` for the J problems of
an outer step) and

    ω = c · γ / (1 + γ |λ|_max),     0 < c < 2 (``omega_factor``, default 1),

where |λ|_max, the dominant eigenvalue's magnitude (what power iteration finds), bounds λ_max from
above whatever its sign, so ω (1/γ + λ) ≤ c < 2; c = 1 leaves a factor 2 of room for an
underestimated |λ|_max. With c = 1 the stiffest mode is removed
in one step and the flattest (λ ≈ 0) contracts by 1 − 1/(1 + γλ_max) per step. Directions with
λ < −1/γ (I + γH indefinite) cannot converge for any ω; the safeguards catch them.

Initial iterate. Alg. 1 starts from x_0 = 0, so after K steps the flat directions (λ ≈ 0, where
x* ≈ g) have only reached 1 − (1 − ω/γ)^K of their value: with a relaxed ω that is about Kω/γ, a
shrunken first-order estimate. ``x0 = "grad"`` starts from the first-order estimate x_0 = g instead:
flat directions start converged and the iteration damps the stiff ones (one extra HVP). At ω = γ the
K-th iterate is then the Neumann series one term longer, Σ_{k≤K} (−γH)^k g; at ω = γ = 1 it is the
paper's iterate x_{K+1}. ``x0 = "grad"`` is the default: with the relaxed ω that a stiff model
needs, x_0 = 0 returns a hypergradient shrunk towards zero (on the toy model ‖x_5‖ ≈ 0.03‖g‖), which
the outer objective of Eq. 3 then all but ignores. ``x0 = "zero"`` is Alg. 1 as printed.

λ_max across outer steps. θ moves little from one outer step to the next, and so does the dominant
eigenvector of the curvature: the solver keeps the last estimate (in ``warm_dtype``; it only seeds
the next power iteration) and starts the next outer step's power iteration from it, with
``warm_power_iters`` products instead of ``power_iters`` (one instead of three by default). When
the eigenvector has turned (a Rayleigh quotient below ``warm_accept`` = 1/2 of the last λ_max; on an
SD-shaped UNet with LoRA simulations the warm estimate fell from 88 to 0.6, and ω set from it made
every solve halve to first-order), the remaining ``power_iters − warm_power_iters`` products follow
from the current vector. Accepting down to half the last λ_max is what c = 1 allows: an estimate
low by a factor below 2 still keeps ω(1/γ + λ) < 2. The vector and λ_max are part of the solver's
state (``state_dict``), so a resumed run continues exactly.

Memory. The iteration keeps three vectors of the size of W besides the curvature's graph: g, x_k and
r_k. b = g/γ is never formed, A x_k is computed into the buffer of the product C·x_k and turned into
r_k in place, and x_k is updated in place (no graph needs its old value).

Safeguards (as in the authors' ``hypergrad.py``): stop when ‖r_k‖ ≤ tol·‖b‖; when the residual grows
(the contraction ratio ‖r_{k+1}‖/‖r_k‖ exceeds 1: some mode is outside the stable range) halve ω and
restart, at most ``max_halvings`` times; then fall back to the first-order estimate g (or raise, or
keep the last iterate). ``max_norm`` optionally rejects estimates larger than a bound the same way.
Diagnostics log ‖x_k‖ and ‖r_k‖ per iteration, ω, λ_max and the number of HVPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from resalign.components import Component, HypergradProblem, HypergradResult
from resalign.errors import SolverError
from resalign.ops import all_finite, axpy, inner, norm, randn_like, scale, to_host, zeros_like

WARM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class RichardsonConfig:
    K: int = 5
    #: proximity coefficient of Eq. 5; None uses the problem's γ (the run's ``gamma``)
    gamma: float | None = None
    #: relaxation ω; None = automatic, c·γ/(1 + γ|λ|_max) with |λ|_max from power iterations
    omega: float | None = None
    omega_factor: float = 1.0
    power_iters: int = 3
    #: power iterations from the previous outer step's eigenvector (0: always start afresh)
    warm_power_iters: int = 1
    #: dtype of the eigenvector kept between outer steps (a starting vector: no fp32 needed)
    warm_dtype: str = "bf16"
    #: a warm estimate below warm_accept × the previous λ_max gets the remaining power iterations
    warm_accept: float = 0.5
    #: stop once ‖r_k‖ ≤ tol · ‖b‖
    tol: float = 1e-10
    max_halvings: int = 5
    #: after max_halvings: "first-order" (return g), "error" (raise SolverError), "none" (last iterate)
    fallback: str = "first-order"
    #: reject an estimate with ‖x_K‖ > max_norm (like the authors' max_grad_norm); None = no bound
    max_norm: float | None = None
    #: false: run exactly K iterations with no checks (plain Alg. 1)
    safeguards: bool = True
    #: initial iterate: "grad" (x_0 = g, the first-order estimate; see the module doc) or "zero" (Alg. 1)
    x0: str = "grad"

    def __post_init__(self):
        if self.K < 1:
            raise ValueError(f"K must be >= 1, got {self.K}")
        if self.gamma is not None and self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.omega is not None and self.omega <= 0:
            raise ValueError(f"omega must be > 0, got {self.omega}")
        if not 0 < self.omega_factor < 2:
            raise ValueError(f"omega_factor must lie in (0, 2), got {self.omega_factor}")
        if self.fallback not in ("first-order", "error", "none"):
            raise ValueError(f"fallback must be first-order, error or none, got {self.fallback!r}")
        if self.x0 not in ("zero", "grad"):
            raise ValueError(f"x0 must be zero or grad, got {self.x0!r}")
        if self.power_iters < 1 or self.warm_power_iters < 0:
            raise ValueError(f"power_iters must be >= 1 and warm_power_iters >= 0, got {self.power_iters}, "
                             f"{self.warm_power_iters}")
        if not 0 <= self.warm_accept <= 1:
            raise ValueError(f"warm_accept must be in [0, 1], got {self.warm_accept}")
        if self.warm_dtype not in WARM_DTYPES:
            raise ValueError(f"warm_dtype must be one of {', '.join(WARM_DTYPES)}, got {self.warm_dtype!r}")


#: the group of :meth:`Richardson.state_dict` that holds the last λ_max per curvature
LAMBDAS = "lambda_max"


def power_iteration(hvp, like, iters: int, seed: int = 0, start=None) -> tuple[float, dict[str, Any]]:
    """Rayleigh-quotient estimate of H's dominant eigenvalue after ``iters`` HVPs, and the last unit
    vector; from ``start`` (e.g. the previous estimate's vector) or a random one."""
    v = {k: start[k].to(t, copy=True) for k, t in like.items()} if start is not None else randn_like(like, seed)
    _scale_(v, 1.0 / max(norm(v), 1e-30))
    lam = 0.0
    for _ in range(iters):
        w = hvp(v)
        lam = inner(v, w)
        n = norm(w)
        if n == 0.0 or not all_finite(w):
            break
        del v
        v = _scale_(w, 1.0 / n)  # two vectors alive at any time: v and C·v
    return lam, v


def _scale_(a, s: float):
    for t in a.values():
        t.mul_(s)
    return a


class Richardson(Component):
    name: ClassVar[str] = "richardson"
    needs_trajectory: ClassVar[bool] = False
    Config = RichardsonConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        #: the last dominant eigenvector and λ_max per curvature operator (module doc: λ_max across outer steps)
        self.eigvecs: dict[str, dict[str, torch.Tensor]] = {}
        self.lambdas: dict[str, float] = {}

    def lambda_max(self, problem: HypergradProblem) -> tuple[float, int]:
        """λ_max of the problem's curvature and the products spent on it: from ``problem.cache`` when
        another problem of this outer step computed it with the same curvature operator, else by power
        iteration, warm-started from the previous outer step's eigenvector when there is one."""
        c, key = self.config, f"lambda_max/{problem.curvature}"
        if key in problem.cache:
            return problem.cache[key], 0
        start = self.eigvecs.get(problem.curvature) if c.warm_power_iters > 0 else None
        if start is not None and (start.keys() != problem.grad_harm.keys()
                                  or any(start[k].shape != v.shape for k, v in problem.grad_harm.items())):
            start = None
        iters = c.power_iters if start is None else c.warm_power_iters
        lam, v = power_iteration(problem.hvp_ft, problem.grad_harm, iters, start=start)
        previous = self.lambdas.get(problem.curvature)
        if start is not None and previous is not None and abs(lam) < c.warm_accept * abs(previous) \
                and c.power_iters > iters:
            # the old eigenvector no longer points at the dominant mode: a Rayleigh quotient far below
            # the last λ_max would set ω too large (ω = cγ/(1 + γλ) leaves a factor 2/c of room)
            lam, v = power_iteration(problem.hvp_ft, problem.grad_harm, c.power_iters - iters, start=v)
            iters = c.power_iters
        if c.warm_power_iters > 0:
            # kept in host memory until the next outer step's first power iteration
            self.eigvecs[problem.curvature] = to_host({k: t.detach().to(WARM_DTYPES[c.warm_dtype])
                                                       for k, t in v.items()})
            self.lambdas[problem.curvature] = float(lam)
        problem.cache[key] = lam
        return lam, iters

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The eigenvectors that warm-start the next power iteration and their λ_max (a resumed run
        needs them)."""
        state = {curv: dict(v) for curv, v in self.eigvecs.items()}
        if self.lambdas:
            state[LAMBDAS] = {curv: torch.tensor(lam, dtype=torch.float64) for curv, lam in self.lambdas.items()}
        return state

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.eigvecs = {curv: dict(v) for curv, v in state.items() if curv != LAMBDAS}
        self.lambdas = {curv: float(t) for curv, t in state.get(LAMBDAS, {}).items()}

    def solve(self, problem: HypergradProblem) -> HypergradResult:
        c = self.config
        gamma = c.gamma if c.gamma is not None else problem.gamma
        g = {k: v.detach() for k, v in problem.grad_harm.items()}
        if not all_finite(g):
            raise SolverError("richardson: the harmful gradient at θ_FT is not finite (the simulated fine-tuning diverged)")
        b_norm = norm(g) / gamma  # ‖b‖, b = g/γ
        diag: dict[str, Any] = {"solver": self.name, "gamma": gamma, "K": c.K, "g_norm": norm(g), "hvps": 0,
                                "curvature": problem.curvature}
        if c.omega is None:
            lam, used = self.lambda_max(problem)
            diag["lambda_max"] = lam
            diag["hvps"] += used
            omega = c.omega_factor * gamma / (1.0 + gamma * abs(lam))
        else:
            omega = c.omega
        diag["omega_initial"] = omega

        def residual(x):
            """r = b − A x = (g − x)/γ − C x, written into the buffer of C x."""
            diag["hvps"] += 1
            r = problem.hvp_ft(x)
            for k, t in r.items():
                t.neg_().add_(g[k], alpha=1.0 / gamma).add_(x[k], alpha=-1.0 / gamma)
            return r

        halvings = 0
        warm = c.x0 == "grad"
        while True:
            x = {k: v.clone() for k, v in g.items()} if warm else zeros_like(g)
            x_norms, residuals, ok = [], [], True
            for k in range(c.K):
                r = residual(x) if (k > 0 or warm) else scale(g, 1.0 / gamma)
                r_norm = norm(r)
                residuals.append(r_norm)
                if not c.safeguards:
                    pass
                elif not all_finite(r) or (k > 0 and r_norm > residuals[-2] * (1 + 1e-6)):
                    ok = False
                    break
                elif r_norm <= c.tol * b_norm:
                    break
                for name, t in x.items():
                    t.add_(r[name], alpha=omega)
                del r
                x_norms.append(norm(x))
            if ok and c.max_norm is not None and x_norms and x_norms[-1] > c.max_norm:
                ok = False
            if ok or not c.safeguards or halvings >= c.max_halvings:
                break
            halvings += 1
            omega /= 2
        diag.update(omega=omega, halvings=halvings, iterations=len(x_norms), x_norms=x_norms,
                    residuals=residuals, fallback=not ok)
        if not ok:
            if c.fallback == "error":
                raise SolverError(
                    f"richardson diverged (‖r‖ {residuals[:1]} -> {residuals[-1:]}) after {halvings} halvings of ω"
                )
            if c.fallback == "first-order":
                x = g
        diag["x_norm"] = norm(x)
        if "lambda_max" in diag:
            diag["omega_lambda"] = omega * abs(diag["lambda_max"])
        # ‖x − g‖/‖g‖: how far the estimate departs from first-order (0: it is first-order)
        diag["correction"] = norm(axpy(-1.0, g, x)) / max(norm(g), 1e-30)
        return HypergradResult(x, diag)
