"""The curvature operators of Eq. 6 against closed forms: Gauss–Newton on linear least squares, where it
is the exact Hessian 2AᵀA/m; on a nonlinear model, JᵀJ from an explicit Jacobian; and equal to the
Hessian where the residuals vanish."""

from __future__ import annotations

import pytest
import torch

from resalign.components import DiffusionContext
from resalign.core.curvature import GaussNewton, make_curvature
from resalign.errors import ConfigError
from tests.fixtures.tiny import random_batch, tiny_context

torch.set_num_threads(1)


def _ctx(model) -> DiffusionContext:
    return DiffusionContext(model=model, theta0={}, schedule=None, uncond=torch.zeros(1, 1, 1))


def _mse(target):
    def loss(ctx, p):
        return ((ctx.model(p) - target) ** 2).mean()
    return loss


def test_gauss_newton_is_the_exact_hessian_of_linear_least_squares():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(7, generator=g, dtype=torch.float64)
    params = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    ctx = _ctx(lambda p: A @ p["w"])
    closed_form = 2.0 * A.T @ A / 7  # ∇² of mean((Aw − y)²), the same for every w
    gn = make_curvature("gauss-newton", ctx, _mse(y), params)
    hess = make_curvature("hessian", ctx, _mse(y), params)
    for k in range(3):
        v = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
        torch.testing.assert_close(gn(v)["w"], closed_form @ v["w"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hess(v)["w"], closed_form @ v["w"], rtol=1e-12, atol=1e-12)


def _mlp(p, x):
    return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]


def _mlp_setup(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    params = {"W1": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "b1": torch.randn(4, generator=g, dtype=torch.float64),
              "W2": torch.randn(4, 2, generator=g, dtype=torch.float64)}
    return g, x, params


def _flat(p):
    return torch.cat([v.reshape(-1) for v in p.values()])


def test_gauss_newton_equals_jt_j_from_an_explicit_jacobian():
    g, x, params = _mlp_setup()
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    names, shapes = list(params), [v.shape for v in params.values()]
    sizes = [v.numel() for v in params.values()]

    def f_flat(w):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(w, sizes), shapes))))
        return _mlp(parts, x).reshape(-1)

    J = torch.autograd.functional.jacobian(f_flat, _flat(params))  # (12, n)
    closed_form = 2.0 * J.T @ J / y.numel()
    gn = GaussNewton(_ctx(lambda p: _mlp(p, x)), _mse(y), params)
    hess = make_curvature("hessian", _ctx(lambda p: _mlp(p, x)), _mse(y), params)
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in params.items()}
    torch.testing.assert_close(_flat(gn(v)), closed_form @ _flat(v), rtol=1e-10, atol=1e-12)
    # with nonzero residuals the Hessian has the extra Σ r_i ∇²f_i term: the two differ
    assert (_flat(hess(v)) - _flat(gn(v))).norm() > 1e-3 * _flat(gn(v)).norm()


def test_gauss_newton_equals_the_hessian_where_the_residual_vanishes():
    g, x, params = _mlp_setup(2)
    y = _mlp(params, x).detach()  # the model fits its targets exactly at these parameters
    ctx = _ctx(lambda p: _mlp(p, x))
    gn, hess = make_curvature("gauss-newton", ctx, _mse(y), params), make_curvature("hessian", ctx, _mse(y), params)
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in params.items()}
        torch.testing.assert_close(_flat(gn(v)), _flat(hess(v)), rtol=1e-10, atol=1e-12)


def test_gauss_newton_of_the_denoising_loss_is_symmetric_and_positive_semidefinite():
    from resalign.losses._common import denoising_loss

    ctx = tiny_context()
    batch = random_batch(2)
    params = {k: v for k, v in ctx.theta0.items() if "attn2" in k}

    def loss(c, p):
        return denoising_loss(c, {**ctx.theta0, **p}, batch, torch.Generator().manual_seed(3))

    gn = GaussNewton(ctx, loss, params)
    g = torch.Generator().manual_seed(4)
    u = {k: torch.randn(t.shape, generator=g) for k, t in params.items()}
    v = {k: torch.randn(t.shape, generator=g) for k, t in params.items()}
    gu, gv = gn(u), gn(v)
    uv = sum(float((u[k].double() * gv[k].double()).sum()) for k in u)
    vu = sum(float((v[k].double() * gu[k].double()).sum()) for k in v)
    assert uv == pytest.approx(vu, rel=1e-4)
    for w, gw in ((u, gu), (v, gv)):
        assert sum(float((w[k].double() * gw[k].double()).sum()) for k in w) > 0


def test_unknown_curvature_is_a_config_error():
    with pytest.raises(ConfigError, match="curvature 'newton'"):
        make_curvature("newton", _ctx(lambda p: p["w"]), _mse(torch.zeros(1)), {"w": torch.zeros(1)})
