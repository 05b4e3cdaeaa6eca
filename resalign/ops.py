"""Arithmetic on parameter dicts (name -> tensor): the vectors of Alg. 1 and of the ADAPT methods.

Public for solver and adapter authors: a plugin's solver works on the same ``Params`` the core hands
it (``HypergradProblem.grad_harm``, ``hvp_ft(v)``), and an adapter's ``init``/``merge`` produce and
consume them. Every function is pure (no tensor is modified in place) and keeps autograd graphs,
except :func:`detach`, :func:`norm`, :func:`inner` and :func:`all_finite`, which read values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

Params = dict[str, torch.Tensor]


def detach(p: Params) -> Params:
    return {k: v.detach() for k, v in p.items()}


def leaves(p: Params) -> Params:
    """Detached copies that require grad: the inputs of a differentiable computation."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}


def aliases(p: Params) -> Params:
    """Detached tensors that require grad and share ``p``'s storage (no copy): the inputs of a
    differentiable computation at values nobody changes in place (θ_FT of a curvature product)."""
    return {k: v.detach().requires_grad_(True) for k, v in p.items()}


def zeros_like(p: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in p.items()}


def randn_like(p: Params, seed: int) -> Params:
    """Standard normal entries of each tensor's shape, drawn in float32 from ``seed`` (device-independent)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float32).to(v) for k, v in p.items()}


def add(a: Params, b: Params, alpha: float = 1.0) -> Params:
    """a + alpha·b over the keys of ``a`` (missing keys of ``b`` count as zero)."""
    return {k: (v + alpha * b[k]) if k in b else v for k, v in a.items()}


def axpy(alpha: float, x: Params, y: Params) -> Params:
    """alpha·x + y over the keys of ``y``."""
    return {k: alpha * x[k] + y[k] for k in y}


def scale(a: Params, s: float | torch.Tensor) -> Params:
    return {k: s * v for k, v in a.items()}


def dot(a: Params, b: Params) -> torch.Tensor:
    """⟨a, b⟩ over the common keys, accumulated in float64 (a differentiable 0-d tensor)."""
    terms = [(a[k].double() * b[k].double()).sum() for k in a if k in b]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


def inner(a: Params, b: Params) -> float:
    """⟨a, b⟩ as a float (no graph)."""
    return float(dot(detach(a), detach(b)))


def norm(a: Params) -> float:
    """‖a‖₂ over all entries, as a float: every tensor's norm accumulated in float64 by one
    ``torch._foreach_norm`` (no float64 copy of ``a``, one synchronisation), then combined."""
    values = [v.detach() for v in a.values()]
    if not values:
        return 0.0
    if not all(v.is_floating_point() for v in values):
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in values))
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(values, 2, dtype=torch.float64))))


def clip_by_norm(a: Params, max_norm: float) -> Params:
    """``a`` scaled so that ‖a‖₂ ≤ max_norm, as ``torch.nn.utils.clip_grad_norm_`` scales gradients.

    The factor min(1, max_norm / (‖a‖ + 1e-6)) is computed with tensors, so the clipping stays
    differentiable (the unrolled path differentiates through clipped inner gradients).
    """
    if not a:
        return a
    values = list(a.values())
    if any(v.requires_grad for v in values):
        norms = [torch.linalg.vector_norm(v.float()) for v in values]
    else:  # no graph to keep: one kernel for all tensors
        norms = torch._foreach_norm([v.float() for v in values])
    factor = torch.clamp(max_norm / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-6), max=1.0)
    return {k: v * factor.to(v.dtype) for k, v in a.items()}


def grads_or_zeros(grads: Iterable[torch.Tensor | None], params: Params) -> Params:
    """Pair ``torch.autograd.grad(..., allow_unused=True)`` output with names; unused -> zeros."""
    return {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}


#: ``RESALIGN_HOST_MEMORY=shared``: on a machine without an accelerator, host-held tensors go to shared
#: memory, so that a measurement tells what an accelerator would hold (the process's anonymous pages)
#: from what stays in host memory (its shared pages; ``benchmarks/bench_memory.py``)
HOST_MEMORY_ENV = "RESALIGN_HOST_MEMORY"


def host_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory, for a vector the accelerator does not need until later (finished
    hypergradients, outer optimizer moments, a warm-start eigenvector): a pinned copy of an
    accelerator's tensor; a CPU tensor itself (moved to shared memory under ``RESALIGN_HOST_MEMORY=shared``)."""
    if t.device.type != "cpu":
        return torch.empty_like(t, device="cpu", pin_memory=torch.cuda.is_available()).copy_(t)
    if os.environ.get(HOST_MEMORY_ENV) == "shared" and not t.is_shared():
        t.share_memory_()
    return t


def to_host(p: Params) -> Params:
    """:func:`host_tensor` of every tensor of ``p``."""
    return {k: host_tensor(v) for k, v in p.items()}


def all_finite(a: Params) -> bool:
    """Whether every entry of ``a`` is finite. A finite 2-norm of every tensor (one
    ``torch._foreach_norm``, one synchronisation) says so at once (a NaN or an inf makes its
    tensor's norm NaN or inf); only when one is not (a non-finite entry, or a float32 norm that
    overflowed) are the entries checked one tensor at a time."""
    values = [v.detach() for v in a.values()]
    if values and all(v.is_floating_point() for v in values) \
            and bool(torch.isfinite(torch.stack(torch._foreach_norm(values, 2))).all()):
        return True
    return all(bool(torch.isfinite(v).all()) for v in values)
