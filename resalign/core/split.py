"""Who computes which simulation j of an outer step, and how the J results meet (Alg. 2 lines 5-10).

The J simulations of an outer step are independent given θ_i, so they may run in several processes.
:class:`ResAlign <resalign.core.meta.ResAlign>` samples the step's J configurations, asks a
:class:`SimulationSplit` to :meth:`~SimulationSplit.assign` them from their predicted costs, gathers
every simulation's small diagnostics (so that every process applies the same outlier rule to all J
values of L_harm(θ_FT,j)), and sums the kept hypergradients with it. :data:`ONE_PROCESS` computes
all of them; :class:`resalign.distributed.Ranks` divides them between the ranks of a ``torchrun``
job by :func:`balanced_owners`.

:class:`StepCache` is ``problem.cache`` of the J problems (:class:`~resalign.components.HypergradProblem`):
the first entry that simulation j = 0 stores (Richardson's λ_max, estimated once per outer step) is
seen by every other simulation of the step; what the others store stays their own. Both rules do not
depend on how the simulations are split, so a split run computes what one process computes.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any, Protocol

import torch

from resalign import distributed

#: The simulation whose first cache entry the others of its outer step share.
SOURCE = 0


class SimulationSplit(Protocol):
    """How the J simulations of an outer step are divided and combined."""

    def assign(self, costs: Sequence[float]) -> tuple[list[int], list[int]]:
        """From each simulation's predicted cost: the process (rank) that computes each simulation j,
        and the simulations of this process in the order it computes them."""

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place."""

    def broadcast(self, obj: Any, src: int) -> Any:
        """Process ``src``'s ``obj``, on every process."""


def balanced_owners(costs: Sequence[float], processes: int) -> list[int]:
    """The process of each simulation: longest predicted cost first, each to the least loaded process
    (ties to the lower rank), with the source simulation pinned to process 0.

    The source goes first on its process, so the entry the others wait for (:class:`StepCache`) is
    ready as early as it can be; the assignment depends only on the costs, so every process computes
    the same one."""
    owners, load = [0] * len(costs), [0.0] * processes
    if costs:
        load[0] = float(costs[SOURCE])
    for j in sorted((j for j in range(len(costs)) if j != SOURCE), key=lambda j: (-costs[j], j)):
        owners[j] = min(range(processes), key=lambda r: (load[r], r))
        load[owners[j]] += float(costs[j])
    return owners


def run_order(owners: Sequence[int], costs: Sequence[float], process: int) -> list[int]:
    """The simulations of ``process``: the source first, then the longest first."""
    mine = [j for j, r in enumerate(owners) if r == process]
    return sorted(mine, key=lambda j: (j != SOURCE, -costs[j], j))


class OneProcess:
    """Every simulation in this process, in the order j = 0, 1, …"""

    def assign(self, costs: Sequence[float]) -> tuple[list[int], list[int]]:
        return [0] * len(costs), list(range(len(costs)))

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def broadcast(self, obj: Any, src: int) -> Any:
        return obj


ONE_PROCESS = OneProcess()


class Ranks:
    """The ranks of a ``torchrun`` job (:mod:`resalign.distributed`), balanced by the simulations'
    predicted costs (:func:`balanced_owners`). Outside ``torchrun`` (or inside
    :func:`resalign.distributed.solo`) it is one process."""

    def assign(self, costs: Sequence[float]) -> tuple[list[int], list[int]]:
        owners = balanced_owners(costs, distributed.world_size())
        return owners, run_order(owners, costs, distributed.rank())

    def gather(self, obj: Any) -> list[Any]:
        return distributed.all_gather_object(obj)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        distributed.all_reduce_sum(tensors)

    def broadcast(self, obj: Any, src: int) -> Any:
        return distributed.broadcast_object(obj, src=src)


class StepCache:
    """The cache of one outer step's problems; :meth:`view` gives simulation j its ``problem.cache``.

    The source simulation's first stored entry reaches the other processes by one broadcast per
    outer step, which every process joins exactly once: the source's owner when it stores the entry
    (or when the source finishes without storing one, :meth:`done`), every other process at its first
    lookup, or at :meth:`close` when it never looks (all its simulations dropped before solving).
    """

    def __init__(self, split: SimulationSplit, source_owner: int = 0):
        self.split, self.source_owner = split, source_owner
        self.shared: dict[str, Any] | None = None  # None: not exchanged yet

    def _exchange(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.shared = self.split.broadcast(entry, src=self.source_owner)
        return self.shared

    def view(self, j: int) -> MutableMapping[str, Any]:
        return _View(self, j)

    def done(self, j: int) -> None:
        """Simulation j has finished (solved or dropped)."""
        if j == SOURCE and self.shared is None:
            self._exchange({})

    def close(self) -> None:
        """This process's simulations of the step are finished."""
        if self.shared is None:
            self._exchange({})


class _View(MutableMapping):
    def __init__(self, step: StepCache, j: int):
        self.step, self.j, self.own = step, j, {}

    def _shared(self) -> dict[str, Any]:
        if self.j == SOURCE:
            return {}
        return self.step.shared if self.step.shared is not None else self.step._exchange({})

    def __getitem__(self, key: str) -> Any:
        if key in self.own:
            return self.own[key]
        return self._shared()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.own[key] = value
        if self.j == SOURCE and self.step.shared is None:
            self.step._exchange({key: value})

    def __delitem__(self, key: str) -> None:
        del self.own[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._shared(), **self.own})

    def __len__(self) -> int:
        return len({**self._shared(), **self.own})
