"""Fréchet distance kernel vs pytorch-fid's calculate_frechet_distance and a numpy eigh oracle."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from resalign import _native
from resalign.errors import NativeError, NumericalError, ShapeError
from resalign.metrics import frechet_distance, frechet_from_features


def pytorch_fid_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's own function (scipy.linalg.sqrtm of Σ1 Σ2)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sqrtm(disp=) in scipy 1.17
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def eigh_oracle(mu1, sigma1, mu2, sigma2) -> float:
    """numpy reference of the eigh form: Σ1 = V Λ Vᵀ, L = V_r Λ_r^{1/2} over the eigenvalues above
    the numerical-rank cutoff d·ε·λ_max, tr (Σ1Σ2)^{1/2} = Σ √μ over the eigenvalues μ of Lᵀ Σ2 L
    above the same cutoff.

    The reduced r × r form matters when Σ1 is singular: the d × d product Σ1^{1/2} Σ2 Σ1^{1/2}
    has d − r round-off eigenvalues of size ε, whose square roots (√ε each) would bias the trace.
    """
    eps_d = sigma1.shape[0] * np.finfo(np.float64).eps
    lam, v = np.linalg.eigh(sigma1)
    keep = lam > eps_d * np.abs(lam).max()
    factor = v[:, keep] * np.sqrt(lam[keep])
    mu = np.linalg.eigvalsh(factor.T @ sigma2 @ factor)
    tr_sqrt = np.sqrt(mu[mu > eps_d * np.abs(mu).max()]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def random_stats(rng, n, d, shift=0.0):
    """Mean and numpy covariance of n correlated Gaussian samples in d dimensions."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    x = rng.standard_normal((n, d)) @ mix + shift + rng.standard_normal(d)
    return x.mean(axis=0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("d", [64, 256])
def test_matches_pytorch_fid(d):
    rng = np.random.default_rng(d)
    mu1, s1 = random_stats(rng, 4 * d, d)
    mu2, s2 = random_stats(rng, 3 * d, d, shift=0.3)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = pytorch_fid_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9)


@pytest.mark.slow
def test_matches_pytorch_fid_at_inception_dimension():
    """d = 2048 (Inception pool features): the one large case (sqrtm takes 20-90 s here)."""
    rng = np.random.default_rng(2048)
    d = 2048
    mu1, s1 = random_stats(rng, d + 500, d)
    mu2, s2 = random_stats(rng, d + 800, d, shift=0.05)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(pytorch_fid_distance(mu1, s1, mu2, s2), rel=1e-9)


def test_float32_statistics_and_threads():
    rng = np.random.default_rng(1)
    mu1, s1 = random_stats(rng, 300, 48)
    mu2, s2 = random_stats(rng, 200, 48, shift=0.1)
    ref = frechet_distance(mu1, s1, mu2, s2, threads=1)
    assert frechet_distance(mu1, s1, mu2, s2, threads=2) == pytest.approx(ref, rel=1e-12)
    f32 = [a.astype(np.float32) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*f32) == pytest.approx(eigh_oracle(*[a.astype(np.float64) for a in f32]), rel=1e-9)


@pytest.mark.parametrize("n1,n2,d", [(40, 60, 128), (20, 300, 64)])
def test_singular_covariance_matches_eigh_oracle(n1, n2, d):
    """n < d: Σ1 is singular; no eps shift moves the result."""
    rng = np.random.default_rng(n1 * d)
    mu1, s1 = random_stats(rng, n1, d)
    mu2, s2 = random_stats(rng, n2, d, shift=0.2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(eigh_oracle(mu1, s1, mu2, s2), rel=1e-9)
    # pytorch-fid's sqrtm agrees up to its own round-off on the singular product
    assert ours == pytest.approx(pytorch_fid_distance(mu1, s1, mu2, s2), rel=1e-6)
    # the swapped order takes the other (Cholesky or eigh) route for Σ1 and gives the same value
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(5)
    for n in (500, 30):  # full rank, then singular
        mu, s = random_stats(rng, n, 64)
        assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_from_features_equals_numpy_statistics():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((120, 16)).astype(np.float32)
    b = rng.standard_normal((90, 16)) + 0.5
    ref = eigh_oracle(
        a.astype(np.float64).mean(0), np.cov(a.astype(np.float64), rowvar=False),
        b.mean(0), np.cov(b, rowvar=False),
    )
    assert frechet_from_features(a, b) == pytest.approx(ref, rel=1e-9)


def test_errors_are_resalign_errors():
    eye = np.eye(3)
    with pytest.raises(ShapeError, match="mu2"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), eye)
    with pytest.raises(ShapeError, match="sigma2"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), np.eye(4))
    with pytest.raises(ShapeError, match="sigma1"):
        _native.frechet_distance(np.zeros(3), np.zeros(3), np.zeros(3), eye)
    with pytest.raises(ShapeError, match="float32 or float64"):
        _native.frechet_distance(np.zeros(3), eye.astype(np.int64), np.zeros(3), eye)
    bad = eye.copy()
    bad[1, 1] = np.nan
    with pytest.raises(NumericalError, match="sigma1.*NaN"):
        frechet_distance(np.zeros(3), bad, np.zeros(3), eye)
    with pytest.raises(NumericalError, match="mu2"):
        frechet_distance(np.zeros(3), eye, np.array([0.0, np.inf, 0.0]), eye)
    with pytest.raises(NumericalError, match="semi-definite"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), -eye)
    assert issubclass(ShapeError, NativeError) and issubclass(NumericalError, NativeError)


def test_thread_setting(monkeypatch):
    monkeypatch.setenv(_native.THREADS_ENV, "2")
    assert _native.resolve_threads() == 2
    assert _native.resolve_threads(3) == 3
    monkeypatch.setenv(_native.THREADS_ENV, "many")
    with pytest.raises(NativeError, match=_native.THREADS_ENV):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    monkeypatch.delenv(_native.THREADS_ENV)
    assert _native.resolve_threads() == _native.DEFAULT_THREADS
