"""Which implementation the hot loops of a simulation run: ``fast`` (the default), ``compiled`` or ``reference``.

A simulated fine-tuning (and downstream fine-tuning, which runs the same ADAPT) is hundreds of small
training steps whose cost on a small model is the dispatch of many small kernels, not arithmetic. The
``fast`` path takes the same steps with fewer kernels and less Python per step:

* the non-differentiable ADAPT updates φ with torch's fused optimizer kernels (one pass over each
  tensor; :meth:`resalign.adapters._optim.Adam.fused_step_`) instead of a dozen ``torch._foreach_*``
  passes, and keeps its leaves and per-step objects across steps (:mod:`resalign.adapters.base`);
* the UNet is called at other parameters by swapping the module's parameter slots directly, looked up
  once (:class:`resalign.core.functional.FunctionalUNet`), instead of ``torch.func.functional_call``
  walking the module tree on every call;
* prior preservation denoises the instance and the class pairs in one model call, as diffusers'
  ``train_dreambooth.py`` does (:func:`resalign.losses._common.denoising_losses`).

The ``compiled`` path is the ``fast`` one with the UNet's calls inside the non-differentiable ADAPT
loop compiled by ``torch.compile`` (:mod:`resalign.core.compiled`: equal to the ``fast`` path to float
rounding; where compilation is unavailable, or ``RESALIGN_COMPILE=0``, it runs as the ``fast`` path).
It is chosen with ``RESALIGN_INNER_LOOP=compiled``, not by default: on the toy model a compiled step
is about 1.2x faster, but a process pays the compilation first (tens of seconds of CPU per input
shape, seconds with Inductor's cache warm), so a toy run of the preset's length gains nothing end to
end (``docs/performance.md``).

The ``reference`` path is the straightforward implementation these replaced, kept to test the fast
one against (``tests/test_fastpath.py``: equal to 1e-6 relative, the fused kernels' rounding apart)
and to time it (``benchmarks/bench_toy_step.py``). ``RESALIGN_INNER_LOOP=reference`` selects it for
a process; :func:`use` switches it at run time (between simulations, never inside one).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from resalign.errors import ConfigError

#: The implementations, the default first.
PATHS = ("fast", "compiled", "reference")
#: Environment variable that selects the path for a process.
ENV = "RESALIGN_INNER_LOOP"

_region = 0
_path = os.environ.get(ENV, PATHS[0]) or PATHS[0]
if _path not in PATHS:
    raise ConfigError(f"{ENV}={_path!r}: expected one of {', '.join(PATHS)}")


def use(name: str) -> None:
    """Select the path ``name`` (one of :data:`PATHS`) for the calls that follow."""
    global _path
    if name not in PATHS:
        raise ConfigError(f"inner loop {name!r}: expected one of {', '.join(PATHS)}")
    _path = name


def current() -> str:
    return _path


def enabled() -> bool:
    """Whether the fast path (or the compiled one, which builds on it) is selected."""
    return _path != "reference"


def compiling() -> bool:
    """Whether the compiled path is selected."""
    return _path == "compiled"


@contextlib.contextmanager
def compile_region() -> Iterator[None]:
    """The model's calls inside may run compiled on the compiled path (:mod:`resalign.core.compiled`):
    for first-order computations only (no ``create_graph``, no forward-mode derivative)."""
    global _region
    _region += 1
    try:
        yield
    finally:
        _region -= 1


def in_compile_region() -> bool:
    return _region > 0
