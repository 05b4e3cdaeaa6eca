"""The core's name for the parameter-dict operations of :mod:`resalign.ops` (the vectors of Alg. 1)."""

from resalign.ops import (  # noqa: F401
    add,
    aliases,
    all_finite,
    axpy,
    clip_by_norm,
    detach,
    dot,
    grads_or_zeros,
    host_tensor,
    inner,
    leaves,
    norm,
    randn_like,
    scale,
    to_host,
    zeros_like,
)
