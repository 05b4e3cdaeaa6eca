"""Hypergradient solvers (Alg. 1 and alternatives): built-in plugin, registered through the same hook as third-party packages.

``richardson`` (Alg. 1 with λ_max-relaxed ω), ``first-order`` (g at θ_FT), ``unrolled``
(backpropagation through the simulated fine-tuning), and two reference methods for the same goal:
``sam`` (the harmful gradient at θ + ρ·g/‖g‖, sharpness-aware) and ``trajectory`` (the harmful loss
averaged along the simulated fine-tuning, first-order in each iterate).
"""

from __future__ import annotations

from resalign.hookspecs import hookimpl
from resalign.solvers.first_order import FirstOrder
from resalign.solvers.richardson import Richardson
from resalign.solvers.sam import SharpnessAware
from resalign.solvers.trajectory import TrajectoryAccumulated
from resalign.solvers.unrolled import Unrolled

SOLVERS = (Richardson, FirstOrder, Unrolled, SharpnessAware, TrajectoryAccumulated)


@hookimpl
def register_solvers(register):
    for cls in SOLVERS:
        register(cls.name, cls)
