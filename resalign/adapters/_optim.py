"""Functional optimizers for ADAPT: ``step(params, grads, state) -> (params, state)``.

They follow ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` exactly (tested against them). ``step`` never
mutates tensors in place, so with ``differentiable=True`` the whole trajectory θ → θ_FT stays one
autograd graph (what the unrolled solver differentiates). ``step_`` is the same update in place,
for simulations that keep no graph: no second copy of φ and of the moments exists at any time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from resalign.components import OPTIMIZERS
from resalign.errors import ConfigError

Tensors = dict[str, torch.Tensor]


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x with a zero (not NaN) derivative at x = 0 (a parameter whose gradient is still zero)."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


@dataclass
class SGD:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def init(self, params: Tensors) -> dict[str, Any]:
        return {"t": 0, "buf": {}}

    def step(self, params: Tensors, grads: Tensors, state: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        out, buf = {}, dict(state["buf"])
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                b = g if k not in buf else self.momentum * buf[k] + g
                buf[k] = b
                g = b
            out[k] = p - self.lr * g
        return out, {"t": state["t"] + 1, "buf": buf}

    @torch.no_grad()
    def step_(self, params: Tensors, grads: Tensors, state: dict[str, Any]) -> dict[str, Any]:
        """:meth:`step` in place: ``params`` (and the momentum buffers) are updated, the state returned."""
        buf = state["buf"]
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                g = buf[k].mul_(self.momentum).add_(g) if k in buf else buf.setdefault(k, g.clone())
            p.add_(g, alpha=-self.lr)
        return {"t": state["t"] + 1, "buf": buf}


@dataclass
class Adam:
    """Adam (L2 ``weight_decay`` added to the gradient) or, with ``decoupled=True``, AdamW."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def init(self, params: Tensors) -> dict[str, Any]:
        return {"t": 0, "m": {k: torch.zeros_like(p) for k, p in params.items()},
                "v": {k: torch.zeros_like(p) for k, p in params.items()}}

    def step(self, params: Tensors, grads: Tensors, state: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        b1, b2 = self.betas
        t = state["t"] + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        out, m_new, v_new = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay and not self.decoupled:
                g = g + self.weight_decay * p
            if self.weight_decay and self.decoupled:
                p = p * (1 - self.lr * self.weight_decay)
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * state["v"][k] + (1 - b2) * g * g
            m_new[k], v_new[k] = m, v
            out[k] = p - self.lr * (m / c1) / (_safe_sqrt(v / c2) + self.eps)
        return out, {"t": t, "m": m_new, "v": v_new}

    @torch.no_grad()
    def step_(self, params: Tensors, grads: Tensors, state: dict[str, Any]) -> dict[str, Any]:
        """:meth:`step` in place, operation for operation (so the same values), on ``torch._foreach_*``
        kernels: ``params`` and the moments are updated, the state returned. For simulations that keep
        no graph: no second copy of φ or of the moments exists at any time, and the temporaries are
        those of one chunk of at most :data:`CHUNK_ELEMENTS` entries (two), not of all of φ.
        """
        t = state["t"] + 1
        keys = list(params)
        for chunk in _chunks(keys, params):
            self._step_chunk([params[k] for k in chunk], [grads[k] for k in chunk],
                             [state["m"][k] for k in chunk], [state["v"][k] for k in chunk], t)
        return {"t": t, "m": state["m"], "v": state["v"]}

    def _step_chunk(self, p: list[torch.Tensor], g: list[torch.Tensor], m: list[torch.Tensor],
                    v: list[torch.Tensor], t: int) -> None:
        b1, b2 = self.betas
        c1, c2 = 1 - b1**t, 1 - b2**t
        if self.weight_decay and not self.decoupled:
            g = torch._foreach_add(g, torch._foreach_mul(p, self.weight_decay))
        if self.weight_decay and self.decoupled:
            torch._foreach_mul_(p, 1 - self.lr * self.weight_decay)
        tmp = torch._foreach_mul(g, 1 - b1)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, tmp)
        torch._foreach_mul_(tmp, 0.0)
        torch._foreach_add_(tmp, g, alpha=1 - b2)  # (1 − β2)·g, as the graph path computes it
        torch._foreach_mul_(tmp, g)
        torch._foreach_mul_(v, b2)
        torch._foreach_add_(v, tmp)
        torch._foreach_copy_(tmp, v)
        torch._foreach_div_(tmp, c2)
        torch._foreach_sqrt_(tmp)
        torch._foreach_add_(tmp, self.eps)  # the denominator √(v/c2) + ε
        upd = torch._foreach_div(m, c1)
        torch._foreach_mul_(upd, self.lr)
        torch._foreach_div_(upd, tmp)
        torch._foreach_sub_(p, upd)  # p − lr·(m/c1)/(√(v/c2) + ε), exactly p + (−update)


#: entries of φ updated by one group of ``torch._foreach_*`` kernels in :meth:`Adam.step_`: its two
#: temporaries stay at 2 × 4M entries (32 MB in fp32; a larger tensor is a chunk of its own) whatever
#: the size of φ, in a few hundred kernel launches for SD-1.5
CHUNK_ELEMENTS = 1 << 22


def _chunks(keys: list[str], params: Tensors) -> list[list[str]]:
    """``keys`` in order, grouped so that each group holds at most :data:`CHUNK_ELEMENTS` entries (a
    larger tensor is a group of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = params[k].numel()
        if groups[-1] and size + n > CHUNK_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return [g for g in groups if g]


def make_optimizer(name: str, lr: float, weight_decay: float | None = None) -> SGD | Adam:
    """The inner optimizer of a configuration C (torch's default hyperparameters; AdamW wd 1e-2)."""
    if name == "sgd":
        return SGD(lr, weight_decay=weight_decay or 0.0)
    if name == "adam":
        return Adam(lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":
        return Adam(lr, weight_decay=1e-2 if weight_decay is None else weight_decay, decoupled=True)
    raise ConfigError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
