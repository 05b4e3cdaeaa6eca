"""Independent runs side by side: one worker process per job, each with its own torch threads.

Short ResAlign runs of an ablation (one per solver or per Tab. 6 variant) share nothing but their inputs.
On a CPU with more cores than a run's threads, :func:`run_jobs` runs them in ``spawn``-ed worker
processes (a fresh interpreter each: no forked torch or OpenMP state); with one job, on a GPU, or for
a single item it runs them inline, in order. Results come back in the order of the items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from resalign.scorers.nudenet import available_cpus

T = TypeVar("T")
R = TypeVar("R")


def default_jobs(device: str, threads: int) -> int:
    """Jobs that fit the machine: the available CPUs // threads per job on a CPU, 1 on an accelerator."""
    if device != "cpu":
        return 1
    return max(1, available_cpus() // max(1, int(threads or 1)))


def run_jobs(fn: Callable[[T], R], items: Sequence[T], jobs: int,
             on_done: Callable[[int, R], None] | None = None) -> list[R]:
    """``[fn(item) for item in items]`` with up to ``jobs`` worker processes (``fn`` must be importable).

    ``on_done(index, result)`` is called in the parent as each job finishes. The first failing job's
    exception is raised once the running ones have stopped.
    """
    results: list[Any] = [None] * len(items)
    if jobs <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = fn(item)
            if on_done:
                on_done(i, results[i])
        return results
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=min(jobs, len(items)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(fn, item): i for i, item in enumerate(items)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                i = pending.pop(future)
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                results[i] = future.result()
                if on_done:
                    on_done(i, results[i])
    return results


__all__ = ["default_jobs", "run_jobs"]
