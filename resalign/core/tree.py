"""Arithmetic on parameter dicts (name -> tensor), the vectors of Alg. 1."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from resalign.components import Params


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


def add(a: Params, b: Params, alpha: float = 1.0) -> Params:
    """a + alpha·b over the keys of ``a`` (missing keys of ``b`` count as zero)."""
    return {k: (v + alpha * b[k]) if k in b else v for k, v in a.items()}


def scale(a: Params, s: float) -> Params:
    return {k: s * v for k, v in a.items()}


def dot(a: Params, b: Params) -> torch.Tensor:
    terms = [(a[k].double() * b[k].double()).sum() for k in a if k in b]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


def norm(a: Params) -> float:
    return math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in a.values()))


def grads_or_zeros(grads: Iterable[torch.Tensor | None], params: Params) -> Params:
    """Pair ``torch.autograd.grad(..., allow_unused=True)`` output with names; unused -> zeros."""
    return {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}


def all_finite(a: Params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())
