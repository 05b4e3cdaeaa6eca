"""Who computes which simulation j of an outer step, and how the J results meet (Alg. 2 lines 5-10).

The J simulations of an outer step are independent given θ_i, so they may run in several processes.
:class:`ResAlign <resalign.core.meta.ResAlign>` asks a :class:`SimulationSplit` for its share of
j ∈ [0, J), gathers every simulation's small diagnostics (so that every process applies the same
outlier rule to all J values of L_harm(θ_FT,j)), and sums the kept hypergradients with it.
:data:`ONE_PROCESS` computes all of them; :class:`resalign.distributed.Ranks` gives rank r the
simulations j ≡ r (mod world size) of a ``torchrun`` job.

:class:`StepCache` is ``problem.cache`` of the J problems (:class:`~resalign.components.HypergradProblem`):
the first entry that simulation j = 0 stores (Richardson's λ_max, estimated once per outer step) is
seen by every other simulation of the step; what the others store stays their own. Both rules do not
depend on how the simulations are split, so a split run computes what one process computes.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any, Protocol

import torch

#: The simulation whose first cache entry the others of its outer step share.
SOURCE = 0


class SimulationSplit(Protocol):
    """How the J simulations of an outer step are divided and combined."""

    def indices(self, n: int) -> list[int]:
        """The simulations j ∈ [0, n) this process computes."""

    def owner(self, j: int) -> int:
        """The process (rank) that computes simulation j."""

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place."""

    def broadcast(self, obj: Any, src: int) -> Any:
        """Process ``src``'s ``obj``, on every process."""


class OneProcess:
    """Every simulation in this process."""

    def indices(self, n: int) -> list[int]:
        return list(range(n))

    def owner(self, j: int) -> int:
        return 0

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def broadcast(self, obj: Any, src: int) -> Any:
        return obj


ONE_PROCESS = OneProcess()


class StepCache:
    """The cache of one outer step's problems; :meth:`view` gives simulation j its ``problem.cache``.

    The source simulation's first stored entry reaches the other processes by one broadcast per
    outer step, which every process joins exactly once: the source's owner when it stores the entry
    (or when the source finishes without storing one, :meth:`done`), every other process at its first
    lookup, or at :meth:`close` when it never looks (all its simulations dropped before solving).
    """

    def __init__(self, split: SimulationSplit):
        self.split = split
        self.shared: dict[str, Any] | None = None  # None: not exchanged yet

    def _exchange(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.shared = self.split.broadcast(entry, src=self.split.owner(SOURCE))
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
