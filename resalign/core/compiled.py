"""The UNet's first-order calls under ``torch.compile`` (the ``compiled`` inner loop of :mod:`resalign.fastpath`).

A simulated fine-tuning (Alg. 2 line 6, ADAPT) is T training steps of batch 1 whose cost on a small
model is the dispatch of hundreds of small kernels per forward and backward pass. Inside a
:func:`resalign.fastpath.compile_region` (the non-differentiable ADAPT loop, :meth:`resalign.adapters.base.MergedAdapter._run_fused`),
:class:`~resalign.core.functional.FunctionalUNet` runs the model through one compiled function of
(parameters, x_t, t, c): TorchDynamo captures the UNet once per input shape, AOTAutograd derives its
backward, and Inductor fuses the pointwise and normalisation kernels around the convolutions and
matrix products (which stay library calls). The backward is compiled together with the forward
(``force_non_lazy_backward_lowering``), so that a backend failure shows at the first call.

Where it does not apply, the model runs eagerly, as on the ``fast`` path:

* outside a region: the unrolled ADAPT, Hessian- and Gauss–Newton products (a compiled graph has
  no double backward and no forward-mode derivative), the losses at θ;
* a process where ``torch.compile`` cannot run (no C++ compiler, an unsupported Python, a model
  Dynamo cannot capture): the first failure is reported once as a :class:`RuntimeWarning` and
  every later call runs eagerly; ``RESALIGN_COMPILE=0`` turns compilation off up front.

Numerics. Inductor's fused kernels compute the same functions with another order of floating-point
operations (e.g. a fused group norm's sums), so a compiled step's gradient differs from the eager
one by float rounding (about 1e-5 of the gradient's scale in fp32 on the toy UNet), and a
simulation's θ_FT, L_harm(θ_FT) and hypergradient differ from the ``fast`` path's by the rounding
those steps accumulate (``tests/test_compiled.py`` bounds it; docs/performance.md). The compiled
kernels are deterministic: the same process, or another process with the same settings, takes the
same steps bit for bit (checkpoints resume bitwise; simulations split over ranks equal one process's).

Compiled code is cached on disk by Inductor (its FX graph cache), so a later process with the same
model and shapes loads it in a few seconds instead of compiling again.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch.func import functional_call

from resalign import fastpath

#: Environment variable: ``0`` turns compilation off (the ``compiled`` path then runs as ``fast``).
ENV = "RESALIGN_COMPILE"

_failed: str | None = None


def available() -> bool:
    """Whether compiled model calls may run in this process (not turned off, no failure so far)."""
    return _failed is None and os.environ.get(ENV, "1") != "0"


def failure() -> str | None:
    """Why compilation was given up in this process (None: it was not)."""
    return _failed


def active() -> bool:
    """Whether a model call now may run compiled: inside a :func:`resalign.fastpath.compile_region`
    on the compiled path, compilation not turned off or failed."""
    return fastpath.in_compile_region() and fastpath.compiling() and available() \
        and not torch.is_inference_mode_enabled()


def _give_up(exc: BaseException) -> None:
    global _failed
    _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    warnings.warn(f"torch.compile is unavailable here ({_failed}); the model runs eagerly from now on "
                  f"(set {ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)


class CompiledCall:
    """``functional_call(module, params, args, kwargs)`` through one ``torch.compile``-d function.

    Returns None (the caller then runs eagerly) when compilation failed, now or before.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

        def call(params: dict[str, torch.Tensor], args: tuple, kwargs: dict[str, Any]):
            return functional_call(module, params, args, kwargs, strict=False)

        try:  # a platform torch.compile does not support refuses here
            self._fn = torch.compile(call, dynamic=False)
        except Exception as exc:  # noqa: BLE001
            _give_up(exc)

    def __call__(self, params, args: tuple, kwargs: dict[str, Any]):
        if not available():
            return None
        try:
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                return self._fn(params, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any backend failure: report once, run eagerly
            _give_up(exc)
            return None
