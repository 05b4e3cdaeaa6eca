"""Functional optimizers for ADAPT: ``step(params, grads, state) -> (params, state)``.

They follow ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` exactly (tested against them). ``step`` never
mutates tensors in place, so with ``differentiable=True`` the whole trajectory θ → θ_FT stays one
autograd graph (what the unrolled solver differentiates). ``step_`` is the same update in place,
for simulations that keep no graph: no second copy of φ and of the moments exists at any time.
``fused_step_`` is the in-place update on lists of tensors with the fewest kernels torch has: Adam's
fused kernel (what ``torch.optim.Adam(fused=True)`` runs: one pass over each tensor, in C++), SGD's
``torch._foreach_*`` ops; it is what the non-differentiable ADAPT runs on the fast path
(:mod:`resalign.fastpath`). SGD's takes exactly ``step_``'s values; Adam's kernel computes the same
update in another order of operations (√v / √c2 instead of √(v / c2), lr / c1 first), so its steps
agree with ``step_``'s to float rounding (``tests/test_fastpath.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from resalign.components import OPTIMIZERS
from resalign.errors import ConfigError

Tensors = dict[str, torch.Tensor]


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether :meth:`Adam.fused_step_` can update ``params``: floating tensors of one dtype on one
    device that torch's fused Adam kernel supports (CPU, CUDA)."""
    if not params:
        return False
    p0 = params[0]
    return (p0.device.type in ("cpu", "cuda") and p0.is_floating_point()
            and all(p.device == p0.device and p.dtype == p0.dtype for p in params))


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

    def fused_init(self, params: list[torch.Tensor]) -> dict[str, Any]:
        return {"t": 0, "buf": None}

    @torch.no_grad()
    def fused_step_(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: dict[str, Any]) -> None:
        """:meth:`step_` on lists, with ``torch._foreach_*`` kernels (the same values): ``params``
        and the momentum buffers updated, ``state`` too."""
        g = torch._foreach_add(grads, params, alpha=self.weight_decay) if self.weight_decay else grads
        if self.momentum:
            if state["buf"] is None:
                state["buf"] = [x.clone() for x in g]
            else:
                torch._foreach_mul_(state["buf"], self.momentum)
                torch._foreach_add_(state["buf"], g)
            g = state["buf"]
        torch._foreach_add_(params, g, alpha=-self.lr)
        state["t"] += 1


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

    def fused_init(self, params: list[torch.Tensor]) -> dict[str, Any]:
        """State of :meth:`fused_step_`: the moments as lists, and the step count as the one tensor
        the fused kernel reads (on the parameters' device)."""
        dev = params[0].device if params else None
        return {"t": 0, "m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params],
                "step": torch.zeros((), dtype=torch.float32, device=dev)}

    @torch.no_grad()
    def fused_step_(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: dict[str, Any]) -> None:
        """The update of :meth:`step_` by torch's fused Adam / AdamW kernel, in place on ``params``
        and the moments (all tensors :func:`fusable`); agrees with :meth:`step_` to float rounding."""
        b1, b2 = self.betas
        state["t"] += 1
        state["step"].fill_(state["t"])
        grads = _same_layout(grads, params)
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        kernel(params, grads, state["m"], state["v"], [], [state["step"]] * len(params), lr=self.lr, beta1=b1,
               beta2=b2, weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False)


def _same_layout(grads: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads``, each in its parameter's memory layout: the fused kernel walks a parameter and its
    gradient element by element in memory order, so a gradient with other strides (a compiled
    backward may return a convolution's weight gradient channels-last) would be read out of place."""
    return [g if g.stride() == p.stride() else torch.empty_like(p).copy_(g) for g, p in zip(grads, params)]


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
