"""The UNet as a function of a parameter dict: ε_θ(x_t, t, c) via :func:`torch.func.functional_call`.

θ, θ_FT and the Hessian-vector products of Alg. 1 all evaluate this one function, so "the model at
other parameters" never means copying or mutating a module. Parameters not in the dict fall back to
the module's own (frozen, original) tensors.

Activation memory. ``checkpointing=True`` recomputes each UNet block (diffusers' block-level gradient
checkpointing) in the backward pass instead of keeping its activations, with
:func:`functional_checkpoint`: non-reentrant (``use_reentrant=False``, so a gradient built with
``create_graph=True`` can be differentiated again, as every HVP of Alg. 1 does), and with the
block's parameters passed to the checkpoint as inputs. diffusers' own checkpoint function recomputes
``module.__call__`` at backward time, when ``functional_call`` has already put the module's own
tensors back: the recomputation would silently use θ_0 instead of θ_FT.

Calling cost. ``functional_call`` walks the module tree on every call (to untie shared weights and to
find each parameter's submodule): for a small UNet a tenth of its forward pass. On the fast path
(:mod:`resalign.fastpath`) :class:`FunctionalUNet` looks every parameter's slot up once and swaps the
given tensors into the slots for the call, what ``functional_call`` does for a module without tied
weights (a module with tied weights, or a name it does not hold, takes ``functional_call``). On the
compiled path, the calls of the non-differentiable ADAPT loop go through one ``torch.compile``-d
``functional_call`` instead (:mod:`resalign.core.compiled`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.func import functional_call
from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from resalign import fastpath
from resalign.components import Cond, Params, unet_kwargs
from resalign.core import compiled


@contextlib.contextmanager
def second_order() -> Iterator[None]:
    """Use the math kernel of ``scaled_dot_product_attention`` inside (it has a double backward).

    The fused CPU / flash / memory-efficient kernels lack a derivative of their backward, so every
    computation that differentiates a gradient (HVPs, unrolled adaptation) runs inside this context,
    forward pass included, since the kernel is chosen when the graph is recorded.
    """
    from torch.nn.attention import SDPBackend

    with sdpa_kernel(SDPBackend.MATH):
        yield


def functional_checkpoint(module: torch.nn.Module, *args):
    """``module(*args)`` under non-reentrant activation checkpointing, differentiable in its parameters.

    The parameters the module holds now (inside ``functional_call``: the substituted θ) are inputs of
    the checkpointed function, and the recomputation substitutes them again; it also runs with the
    attention kernels chosen now (:func:`second_order`'s math kernel, whose backward has a derivative),
    whatever is selected when the backward pass runs. Autocast is restored by ``checkpoint`` itself.
    """
    params = dict(module.named_parameters())
    names, n = list(params), len(params)
    backends = _cur_sdpa_kernel_backends()

    def run(*flat):
        with sdpa_kernel(backends):
            return functional_call(module, dict(zip(names, flat[:n])), flat[n:], strict=False)

    return checkpoint(run, *params.values(), *args, use_reentrant=False)


class ParameterSlots:
    """The parameter and buffer slots of a module, by name, looked up once: ``with swapped(tensors):``
    calls it with ``tensors`` in place of its own, as ``functional_call(..., strict=False)`` does for a
    module without tied weights (``usable`` is False when it has some)."""

    def __init__(self, module: torch.nn.Module):
        self.slots: dict[str, tuple[dict, str]] = {}
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for attr, store in (*((a, sub._parameters) for a in sub._parameters),
                                *((a, sub._buffers) for a in sub._buffers)):
                self.slots[f"{prefix}.{attr}" if prefix else attr] = (store, attr)
        held = [t for store, attr in self.slots.values() if (t := store[attr]) is not None]
        self.usable = len({id(t) for t in held}) == len(held)

    def covers(self, tensors: Params) -> bool:
        return self.usable and all(k in self.slots for k in tensors)

    @contextlib.contextmanager
    def swapped(self, tensors: Params) -> Iterator[None]:
        slots = [self.slots[k] for k in tensors]
        saved = [store[attr] for store, attr in slots]
        try:
            for (store, attr), t in zip(slots, tensors.values()):
                store[attr] = t
            yield
        finally:
            for (store, attr), t in zip(slots, saved):
                store[attr] = t


class FunctionalUNet:
    """``model(params, x_t, t, cond) -> ε`` for a diffusers ``UNet2DConditionModel`` (``components.ModelFn``).

    ``cond`` is hidden states or a :class:`~resalign.components.Conditioning`, whose pooled embedding
    and time ids go to the UNet as ``added_cond_kwargs`` (SDXL's ``text_time`` embedding).

    ``compute_dtype`` (bf16 / fp16) runs the forward pass under autocast while the parameters given
    stay fp32 (master weights); the prediction is then returned in fp32. ``checkpointing`` recomputes
    the UNet blocks' activations in the backward pass (:func:`functional_checkpoint`).
    """

    def __init__(self, unet: torch.nn.Module, compute_dtype: torch.dtype | None = None, checkpointing: bool = False):
        self.unet = unet
        self.compute_dtype = compute_dtype if compute_dtype not in (None, torch.float32) else None
        self.checkpointing = checkpointing
        if checkpointing:
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=functional_checkpoint)
        self._slots: ParameterSlots | None = None
        self._compiled = None

    def _call(self, params: Params, args: tuple, kwargs: dict):
        if not self.checkpointing and compiled.active():
            if self._compiled is None:
                self._compiled = compiled.CompiledCall(self.unet)
            out = self._compiled(params, args, kwargs)
            if out is not None:
                return out
        if fastpath.enabled():
            if self._slots is None:
                self._slots = ParameterSlots(self.unet)
            if self._slots.covers(params):
                with self._slots.swapped(params):
                    return self.unet(*args, **kwargs)
        return functional_call(self.unet, params, args, kwargs, strict=False)

    def base_params(self) -> Params:
        """The module's own parameters (the frozen original θ_0), without copies."""
        return {k: v.detach() for k, v in self.unet.named_parameters()}

    def __call__(self, params: Params, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        kwargs = {**unet_kwargs(cond), "return_dict": False}
        if self.compute_dtype is None:
            return self._call(params, (x_t, t), kwargs)[0]
        with torch.autocast(device_type=x_t.device.type, dtype=self.compute_dtype):
            out = self._call(params, (x_t, t), kwargs)[0]
        return out.float()
