"""The method as code: functional parameters, HVPs, the objective (Eq. 3/4), Alg. 1 driver, Alg. 2.

Public entry points:

* :class:`~resalign.core.functional.FunctionalUNet` — ε_θ(x_t, t, c) as a function of a parameter dict;
* :func:`~resalign.core.hvp.make_hvp` — ∇²L · v by double backward;
* :func:`~resalign.core.curvature.make_curvature` — the curvature product of Eq. 6 (Hessian or
  Gauss–Newton);
* :func:`~resalign.core.problem.build_hypergrad_problem` — one sampled configuration C's
  :class:`~resalign.components.HypergradProblem` (θ, θ_FT, g, HVP closure, unroll closure), so solvers
  can be compared against the exact (unrolled) hypergradient;
* :class:`~resalign.core.meta.ResAlign` — one outer step of Alg. 2 and its state.
"""

from __future__ import annotations

from resalign.core.curvature import CURVATURES, make_curvature
from resalign.core.functional import FunctionalUNet, second_order
from resalign.core.hvp import make_hvp
from resalign.core.meta import ConfigPool, MethodSettings, ResAlign
from resalign.core.problem import SimulationData, build_hypergrad_problem, simulate

__all__ = [
    "CURVATURES",
    "ConfigPool",
    "FunctionalUNet",
    "MethodSettings",
    "ResAlign",
    "SimulationData",
    "build_hypergrad_problem",
    "make_curvature",
    "make_hvp",
    "second_order",
    "simulate",
]
