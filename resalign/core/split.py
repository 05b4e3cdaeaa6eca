"""Who computes which simulation j of an outer step, and how the J results meet (Alg. 2 lines 5-10).

The J simulations of an outer step are independent given θ_i, so they may run in several processes.
:class:`ResAlign <resalign.core.meta.ResAlign>` samples the step's J configurations, asks a
:class:`SimulationSplit` to :meth:`~SimulationSplit.assign` them from their predicted costs, gathers
every simulation's small diagnostics (so that every process applies the same outlier rule to all J
values of L_harm(θ_FT,j)), and sums the kept hypergradients with it. :data:`ONE_PROCESS` computes
all of them; :class:`resalign.distributed.Ranks` divides them between the ranks of a ``torchrun``
job by :func:`balanced_owners`.

:class:`StepCache` is ``problem.cache`` of the J problems (:class:`~resalign.components.HypergradProblem`):
the first entry that the step's source simulation stores (Richardson's λ_max, estimated once per
outer step) is seen by every other simulation of the step; what the others store stays their own.
The source is the simulation of least predicted cost (:func:`source_of`), so it is ready before the
others need it. These rules do not depend on how the simulations are split, so a split run computes
what one process computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, Protocol

import torch

from resalign import distributed


def source_of(costs: Sequence[float]) -> int:
    """The source simulation of an outer step, whose first cache entry the others share: the one of
    least predicted cost (the lowest j among equals), which reaches its solve first."""
    return min(range(len(costs)), key=lambda j: (costs[j], j)) if costs else 0


class SimulationSplit(Protocol):
    """How the J simulations of an outer step are divided and combined."""

    #: this process's rank
    rank: int

    def assign(self, costs: Sequence[float]) -> tuple[list[int], list[int]]:
        """From each simulation's predicted cost: the process (rank) that computes each simulation j,
        and the simulations of this process in the order it computes them."""

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place."""

    def start_broadcast(self, obj: Any, src: int) -> Callable[[], Any]:
        """Begin sending process ``src``'s ``obj`` to every process; the returned ``finish`` gives it
        (on ``src`` it waits for the sends, elsewhere it receives). ``src`` does not wait for the others."""


def balanced_owners(costs: Sequence[float], processes: int) -> list[int]:
    """The process of each simulation: longest predicted cost first, each to the least loaded process
    (ties to the lower rank), with the source simulation (:func:`source_of`) pinned to process 0.

    The source goes first on its process, so the entry the others wait for (:class:`StepCache`) is
    ready as early as it can be; the assignment depends only on the costs, so every process computes
    the same one."""
    owners, load, source = [0] * len(costs), [0.0] * processes, source_of(costs)
    if costs:
        load[0] = float(costs[source])
    for j in sorted((j for j in range(len(costs)) if j != source), key=lambda j: (-costs[j], j)):
        owners[j] = min(range(processes), key=lambda r: (load[r], r))
        load[owners[j]] += float(costs[j])
    return owners


def run_order(owners: Sequence[int], costs: Sequence[float], process: int) -> list[int]:
    """The simulations of ``process``: the source first, then the longest first."""
    mine, source = [j for j, r in enumerate(owners) if r == process], source_of(costs)
    return sorted(mine, key=lambda j: (j != source, -costs[j], j))


class OneProcess:
    """Every simulation in this process: the source first, then j = 0, 1, …"""

    rank = 0

    def assign(self, costs: Sequence[float]) -> tuple[list[int], list[int]]:
        source = source_of(costs)
        return [0] * len(costs), [source, *(j for j in range(len(costs)) if j != source)]

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def start_broadcast(self, obj: Any, src: int) -> Callable[[], Any]:
        return lambda: obj


ONE_PROCESS = OneProcess()


class Ranks:
    """The ranks of a ``torchrun`` job (:mod:`resalign.distributed`), balanced by the simulations'
    predicted costs (:func:`balanced_owners`). Outside ``torchrun`` (or inside
    :func:`resalign.distributed.solo`) it is one process."""

    @property
    def rank(self) -> int:
        return distributed.rank()

    def assign(self, costs: Sequence[float]) -> tuple[list[int], list[int]]:
        owners = balanced_owners(costs, distributed.world_size())
        return owners, run_order(owners, costs, distributed.rank())

    def gather(self, obj: Any) -> list[Any]:
        return distributed.all_gather_object(obj)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        distributed.all_reduce_sum(tensors)

    def start_broadcast(self, obj: Any, src: int) -> Callable[[], Any]:
        return distributed.start_broadcast(obj, src=src)


class StepCache:
    """The cache of one outer step's problems; :meth:`view` gives simulation j its ``problem.cache``.

    The source simulation's first stored entry reaches the other processes by one broadcast per
    outer step, which every process joins exactly once: the source's owner starts it when the entry
    is stored (or when the source finishes without storing one, :meth:`done`) and goes on without
    waiting; every other process receives it at its first lookup, or at :meth:`close` when it never
    looks (all its simulations dropped before solving). :meth:`close` also waits for the source's sends.
    """

    def __init__(self, split: SimulationSplit, source: int = 0, source_owner: int = 0):
        self.split, self.source, self.source_owner = split, source, source_owner
        self.shared: dict[str, Any] | None = None  # None: not exchanged yet
        self._sent: Callable[[], Any] | None = None

    def _exchange(self, entry: dict[str, Any]) -> dict[str, Any]:
        finish = self.split.start_broadcast(entry, src=self.source_owner)
        if self._owns_source:
            self.shared, self._sent = entry, finish
        else:
            self.shared = finish()
        return self.shared

    @property
    def _owns_source(self) -> bool:
        return self.split.rank == self.source_owner

    def view(self, j: int) -> MutableMapping[str, Any]:
        return _View(self, j)

    def done(self, j: int) -> None:
        """Simulation j has finished (solved or dropped)."""
        if j == self.source and self.shared is None:
            self._exchange({})

    def close(self) -> None:
        """This process's simulations of the step are finished."""
        if self.shared is None:
            self._exchange({})
        if self._sent is not None:
            self._sent()
            self._sent = None


class _View(MutableMapping):
    def __init__(self, step: StepCache, j: int):
        self.step, self.j, self.own = step, j, {}

    def _shared(self) -> dict[str, Any]:
        if self.j == self.step.source:
            return {}
        return self.step.shared if self.step.shared is not None else self.step._exchange({})

    def __getitem__(self, key: str) -> Any:
        if key in self.own:
            return self.own[key]
        return self._shared()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.own[key] = value
        if self.j == self.step.source and self.step.shared is None:
            self.step._exchange({key: value})

    def __delitem__(self, key: str) -> None:
        del self.own[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._shared(), **self.own})

    def __len__(self) -> int:
        return len({**self._shared(), **self.own})
