"""resalign.ops, the public parameter-dict arithmetic, against torch's own flat-vector operations."""

from __future__ import annotations

import pytest
import torch

from resalign import ops


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({"w": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)},
            {"w": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)})


def _flat(p):
    return torch.cat([v.reshape(-1) for v in p.values()])


def test_vector_operations_equal_the_flat_vector_ones():
    a, b = _pair()
    assert ops.inner(a, b) == pytest.approx(float(_flat(a) @ _flat(b)), rel=1e-6)
    assert ops.norm(a) == pytest.approx(float(_flat(a).norm()), rel=1e-6)
    torch.testing.assert_close(_flat(ops.axpy(-0.5, a, b)), -0.5 * _flat(a) + _flat(b))
    torch.testing.assert_close(_flat(ops.add(a, b, 2.0)), _flat(a) + 2.0 * _flat(b))
    assert ops.all_finite(a) and not ops.all_finite({"x": torch.tensor([float("nan")])})
    assert ops.randn_like(a, 3)["w"].shape == (4, 3) and torch.equal(ops.randn_like(a, 3)["w"], ops.randn_like(a, 3)["w"])


def test_norm_accumulates_in_float64_and_all_finite_sees_every_entry():
    """‖a‖ of float32 tensors whose float32 sum of squares would overflow equals the float64 norm of
    the flat vector; a NaN or an inf in any entry of any tensor is seen, a large finite value is not."""
    g = torch.Generator().manual_seed(1)
    a = {f"t{i}": torch.randn(7, i + 1, generator=g) * 1e25 for i in range(40)}
    assert ops.norm(a) == pytest.approx(float(_flat(a).double().norm()), rel=1e-14)
    assert ops.norm({"x": torch.tensor([3, 4])}) == 5.0 and ops.norm({}) == 0.0
    assert ops.all_finite({**a, "big": torch.tensor([3e38, -3e38])})
    for bad in (float("nan"), float("inf"), -float("inf")):
        b = {k: v.clone() for k, v in a.items()}
        b["t39"][6, 39] = bad
        assert not ops.all_finite(b)
        assert not ops.all_finite({**a, "x": torch.tensor([bad], dtype=torch.float64)})


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_norm_is_clip_grad_norm(max_norm):
    a, _ = _pair(1)
    params = [torch.nn.Parameter(torch.zeros_like(v)) for v in a.values()]
    for p, v in zip(params, a.values()):
        p.grad = v.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    clipped = ops.clip_by_norm(a, max_norm)
    for p, k in zip(params, a):
        assert torch.equal(clipped[k], p.grad)
    # with a graph: the same values, differentiable
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    with_graph = ops.clip_by_norm(leaves, max_norm)
    assert all(torch.equal(with_graph[k].detach(), clipped[k]) for k in a)
    (grad,) = torch.autograd.grad(ops.norm(a) * 0 + with_graph["w"].sum(), [leaves["w"]])
    assert torch.isfinite(grad).all()
