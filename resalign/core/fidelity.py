"""How close a hypergradient estimate is to the exact one, and what it costs (Appendix E.1).

The exact hypergradient of a simulated fine-tuning is the derivative of L_harm(θ_FT(θ)) through all T
adaptation steps (the ``unrolled`` solver with T small enough to differentiate through). Every other
estimate — Richardson's Moreau-envelope solve (Alg. 1), first-order, a plugin's — is scored against it
by cosine similarity and relative error, and timed with its peak memory, in the same process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from resalign.components import HypergradProblem, HypergradResult, Params, Solver
from resalign.core import tree


def cosine(a: Params, b: Params) -> float:
    """cos∠(a, b) over all parameters; 0 when either is zero."""
    na, nb = tree.norm(a), tree.norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(tree.dot(a, b)) / (na * nb)


def relative_error(estimate: Params, exact: Params) -> float:
    """‖estimate − exact‖ / ‖exact‖ (inf when the exact hypergradient is zero and the estimate is not)."""
    diff = tree.norm(tree.add(estimate, exact, alpha=-1.0))
    ne = tree.norm(exact)
    if ne == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ne


class PeakMemory:
    """Peak memory above the starting level while the block runs, in bytes.

    On CUDA it is ``torch.cuda.max_memory_allocated``; on CPU the process's resident set size sampled
    every ``interval`` seconds by a background thread (psutil), so short spikes can be missed.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self._proc.memory_info().rss)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_bytes = max(0, self._peak - self._base)


@dataclass
class Measurement:
    """One solver's estimate on one problem, scored against the exact hypergradient."""

    cosine: float
    relative_error: float
    seconds: float
    peak_mb: float
    diagnostics: dict[str, Any] = field(default_factory=dict)


def measure(
    solver: Solver,
    problem: HypergradProblem,
    exact: Params,
    *,
    device: str | torch.device = "cpu",
    fresh_problem: Callable[[], HypergradProblem] | None = None,
) -> Measurement:
    """Run ``solver`` on ``problem`` (or on ``fresh_problem()``, so caches from other solvers do not
    make it look cheaper) and score its hypergradient against ``exact``."""
    if fresh_problem is not None:
        problem = fresh_problem()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        result: HypergradResult = solver.solve(problem)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return Measurement(
        cosine=cosine(result.hypergrad, exact),
        relative_error=relative_error(result.hypergrad, exact),
        seconds=seconds,
        peak_mb=mem.peak_bytes / 2**20,
        diagnostics=result.diagnostics,
    )
