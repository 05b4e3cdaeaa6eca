"""Vector arithmetic on parameter dicts for the solvers (kept local: plugins do not import the core)."""

from __future__ import annotations

import math

import torch

Params = dict[str, torch.Tensor]


def axpy(alpha: float, x: Params, y: Params) -> Params:
    """alpha·x + y."""
    return {k: alpha * x[k] + y[k] for k in y}


def scale(a: Params, s: float) -> Params:
    return {k: s * v for k, v in a.items()}


def dot(a: Params, b: Params) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def norm(a: Params) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in a.values()))


def finite(a: Params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())


def zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def randn_like(a: Params, seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float32).to(v) for k, v in a.items()}
