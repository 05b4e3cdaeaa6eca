"""The UNet as a function of a parameter dict: ε_θ(x_t, t, c) via :func:`torch.func.functional_call`.

θ, θ_FT and the Hessian-vector products of Alg. 1 all evaluate this one function, so "the model at
other parameters" never means copying or mutating a module. Parameters not in the dict fall back to
the module's own (frozen, original) tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.func import functional_call

from resalign.components import Params


@contextlib.contextmanager
def second_order() -> Iterator[None]:
    """Use the math kernel of ``scaled_dot_product_attention`` inside (it has a double backward).

    The fused CPU / flash / memory-efficient kernels lack a derivative of their backward, so every
    computation that differentiates a gradient (HVPs, unrolled adaptation) runs inside this context,
    forward pass included, since the kernel is chosen when the graph is recorded.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class FunctionalUNet:
    """``model(params, x_t, t, cond) -> ε`` for a diffusers ``UNet2DConditionModel`` (``components.ModelFn``).

    ``compute_dtype`` (bf16 / fp16) runs the forward pass under autocast while the parameters given
    stay fp32 (master weights); the prediction is then returned in fp32.
    """

    def __init__(self, unet: torch.nn.Module, compute_dtype: torch.dtype | None = None):
        self.unet = unet
        self.compute_dtype = compute_dtype if compute_dtype not in (None, torch.float32) else None

    def base_params(self) -> Params:
        """The module's own parameters (the frozen original θ_0), without copies."""
        return {k: v.detach() for k, v in self.unet.named_parameters()}

    def __call__(self, params: Params, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        kwargs = {"encoder_hidden_states": cond, "return_dict": False}
        if self.compute_dtype is None:
            return functional_call(self.unet, params, (x_t, t), kwargs, strict=False)[0]
        with torch.autocast(device_type=x_t.device.type, dtype=self.compute_dtype):
            out = functional_call(self.unet, params, (x_t, t), kwargs, strict=False)[0]
        return out.float()
