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
        """:meth:`step` in place: ``params`` and the moments are updated, the state returned."""
        b1, b2 = self.betas
        t = state["t"] + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay and not self.decoupled:
                g = g.add(p, alpha=self.weight_decay)
            if self.weight_decay and self.decoupled:
                p.mul_(1 - self.lr * self.weight_decay)
            m, v = state["m"][k].mul_(b1).add_(g, alpha=1 - b1), state["v"][k].mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.div(c2).sqrt_().add_(self.eps), value=-self.lr / c1)
        return {"t": t, "m": state["m"], "v": state["v"]}


def make_optimizer(name: str, lr: float) -> SGD | Adam:
    """The inner optimizer of a configuration C (torch's default hyperparameters; AdamW wd 1e-2)."""
    if name == "sgd":
        return SGD(lr)
    if name == "adam":
        return Adam(lr)
    if name == "adamw":
        return Adam(lr, weight_decay=1e-2, decoupled=True)
    raise ConfigError(f"optimizer {name!r}: expected one of sgd, adam, adamw")
