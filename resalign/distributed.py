"""Processes of a ``torchrun`` job: who this process is, which items it takes, and the collectives.

The work of resalign splits into independent items: the J simulations of an outer step (Alg. 2 lines
5-9), the prompts of an evaluation, the cells of ``attack`` / ``compare`` / ``ablate``. Under
``torchrun`` rank r takes the items i ≡ r (mod world size) (:func:`my_indices`); sums are all-reduced
(:func:`all_reduce_sum`), Python objects gathered (:func:`all_gather_object`); rank 0 alone writes
(:func:`is_main`). Without torchrun (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) every
function is the single-process identity, so the same code runs in both.

Backends: NCCL for CUDA devices, gloo otherwise. Every collective has a timeout
(``RESALIGN_DIST_TIMEOUT_S``, default 6 h), so a rank that fails stops the job with its error
instead of leaving the others waiting for ever. The wait covers a whole cell of a sweep on another rank
(a ResAlign unlearning run inside ``compare`` is one cell): 30 minutes, the former default, ended a
3-seed toy comparison whose last unlearning run took longer on a loaded 2-core machine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from resalign.errors import ConfigError, ResAlignError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 6 * 3600.0
#: Elements per all-reduce: :func:`all_reduce_sum` packs small tensors into buckets up to this size.
BUCKET_ELEMENTS = 1 << 24
_solo_depth = 0


def _env_world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r}: expected a positive integer") from None
    if n < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r}: expected a positive integer")
    return n


def launched() -> bool:
    """Whether this process was started as one of several ranks (``WORLD_SIZE`` > 1, as torchrun sets it)."""
    return _env_world_size() > 1


def timeout_s() -> float:
    """Seconds a collective may wait for the other ranks (``RESALIGN_DIST_TIMEOUT_S``)."""
    raw = os.environ.get("RESALIGN_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        t = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable RESALIGN_DIST_TIMEOUT_S={raw!r}: expected seconds > 0") from None
    if not t > 0:
        raise ConfigError(f"environment variable RESALIGN_DIST_TIMEOUT_S={raw!r}: expected seconds > 0")
    return t


def backend_for(device: str) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if str(device).startswith("cuda") and dist.is_nccl_available() else "gloo"


def local_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process); other devices unchanged."""
    if str(device) == "cuda" and active():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def init(device: str = "cpu") -> bool:
    """Join the torchrun job described by the environment, once; return whether it is distributed.

    Does nothing (and returns False) when ``WORLD_SIZE`` is absent or 1. Under torchrun the
    ``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` variables it sets are used (``env://``).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several ranks of an initialised job (and not inside :func:`solo`)."""
    return _solo_depth == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Inside, this rank behaves as a single process: for a cell that one rank computes whole (a
    fine-tuning run of ``compare``), whose own work must not be split or synchronised again."""
    global _solo_depth
    _solo_depth += 1
    try:
        yield
    finally:
        _solo_depth -= 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes run directories, checkpoints and progress."""
    return rank() == 0


def my_indices(n: int) -> list[int]:
    """The item indices i ∈ [0, n) with i ≡ rank (mod world size)."""
    return list(range(rank(), n, world_size()))


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """``(i, item)`` for this rank's items (:func:`my_indices`)."""
    return [(i, items[i]) for i in my_indices(len(items))]


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_items(mine: Sequence[tuple[int, T]], n: int) -> list[T]:
    """The full list of ``n`` items from each rank's ``(i, item)`` pairs, on every rank, in index order."""
    merged: dict[int, T] = {}
    for part in all_gather_object(list(mine)):
        merged.update(dict(part))
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"items {missing[:5]} were computed by no rank")
    return [merged[i] for i in range(n)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def start_broadcast(obj: Any, src: int) -> Callable[[], Any]:
    """Begin broadcasting rank ``src``'s ``obj``; returns ``finish``, which gives ``obj`` on every rank.

    On ``src`` this call returns at once (the sends run on the process group's worker thread) and
    ``finish`` waits for them; on the other ranks ``finish`` receives. So the source goes on with its
    work while the others join when they need the object, instead of the source waiting for the
    slowest of them as in :func:`broadcast_object`. Every rank calls it once, in the same order
    relative to the other collectives. The payload is pickled, as :func:`broadcast_object` does; it
    comes only from a rank of the same job.
    """
    if not active():
        return lambda: obj
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if rank() == src:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
        works = [dist.broadcast(size, src, async_op=True), dist.broadcast(payload, src, async_op=True)]

        def finish_sent() -> Any:
            for work in works:
                work.wait()
            return obj
        return finish_sent

    def finish_received() -> Any:
        size = torch.zeros(1, dtype=torch.int64, device=device)
        dist.broadcast(size, src)
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.broadcast(payload, src)
        return pickle.loads(payload.cpu().numpy().tobytes())
    return finish_received


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (a no-op in a single process).

    Tensors of one dtype and device travel together in buckets of up to :data:`BUCKET_ELEMENTS`
    elements (one all-reduce for the hundreds of small tensors of a UNet instead of one each).
    """
    if not active():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in [*group, None]:
            if bucket and (t is None or size + t.numel() > BUCKET_ELEMENTS):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                    b.copy_(part.view_as(b))
                bucket, size = [], 0
            if t is not None:
                bucket.append(t)
                size += t.numel()


def on_main(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 (None on the others); a :class:`ResAlignError` it raises is raised on every
    rank, so a bad ``--out`` or ``--resume`` stops the whole job with rank 0's message."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except ResAlignError as exc:
            error = exc
    error = broadcast_object(error)
    if error is not None:
        raise error
    return result
