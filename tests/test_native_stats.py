"""Streaming feature statistics vs numpy; merging; .npz files readable as pytorch-fid stats."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from resalign import _native
from resalign.errors import DataError, NumericalError, ShapeError
from resalign.metrics import FeatureAccumulator, FeatureStats


def features(rng, n, d, dtype=np.float64):
    """Non-negative, correlated features with a large mean (like pooled CNN activations)."""
    base = rng.gamma(2.0, 1.0, size=(n, d)) + 50.0
    return (base + 0.5 * base[:, :1]).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batches_equal_numpy_mean_and_cov(dtype):
    rng = np.random.default_rng(0)
    x = features(rng, 333, 40, dtype)
    acc = FeatureAccumulator(40)
    for chunk in np.array_split(x, [1, 50, 50, 200]):  # includes a 1-row and an empty batch
        acc.update(chunk)
    x64 = x.astype(np.float64)
    assert acc.count == 333
    np.testing.assert_allclose(acc.mean(), x64.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(acc.covariance(), np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)
    assert acc.covariance().dtype == np.float64


def test_merge_equals_one_accumulator_over_concatenation():
    rng = np.random.default_rng(1)
    a, b, c = features(rng, 70, 24), features(rng, 5, 24), features(rng, 130, 24)
    shards = []
    for part in (a, b, c):
        acc = FeatureAccumulator(24)
        acc.update(part)
        shards.append(acc)
    merged = shards[0]
    merged.merge(shards[1])
    merged.merge(shards[2])
    whole = FeatureAccumulator(24)
    whole.update(np.concatenate([a, b, c]))
    assert merged.count == whole.count == 205
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-13)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(
        merged.covariance(), np.cov(np.concatenate([a, b, c]), rowvar=False), rtol=1e-10, atol=1e-12
    )


def test_pickle_round_trip_for_sharded_workers():
    rng = np.random.default_rng(2)
    acc = FeatureAccumulator(8)
    acc.update(features(rng, 30, 8))
    back = pickle.loads(pickle.dumps(acc))
    assert (back.dim, back.count) == (8, 30)
    np.testing.assert_array_equal(back.mean(), acc.mean())
    np.testing.assert_array_equal(back.covariance(), acc.covariance())
    count, mean, comoment = acc.state()
    again = FeatureAccumulator.from_state(count, mean, comoment)
    np.testing.assert_array_equal(again.covariance(), acc.covariance())


def test_errors():
    acc = FeatureAccumulator(4)
    with pytest.raises(ShapeError, match="dim=4"):
        acc.update(np.zeros((3, 5)))
    with pytest.raises(ShapeError, match="2-d"):
        acc.update(np.zeros(4))
    with pytest.raises(ShapeError, match="float32 or float64"):
        acc.update(np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(NumericalError, match="NaN"):
        acc.update(np.full((2, 4), np.nan))
    acc.update(np.ones((1, 4)))
    with pytest.raises(NumericalError, match="at least 2"):
        acc.covariance()
    with pytest.raises(ShapeError, match="different feature dimensions"):
        acc.merge(FeatureAccumulator(5))
    with pytest.raises(ShapeError):
        FeatureAccumulator(0)


def test_npz_round_trip_is_pytorch_fid_compatible(tmp_path):
    rng = np.random.default_rng(3)
    x = features(rng, 50, 16)
    stats = FeatureStats.from_features(x)
    path = stats.save(tmp_path / "ref")
    assert path.suffix == ".npz"
    # pytorch-fid reads stats files like this (fid_score.compute_statistics_of_path)
    with np.load(path) as f:
        m, s = f["mu"][:], f["sigma"][:]
    np.testing.assert_allclose(m, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(s, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    back = FeatureStats.load(path)
    assert back.count == 50
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    # a file written the way pytorch-fid's --save-stats does (savez_compressed, mu/sigma only)
    np.savez_compressed(tmp_path / "fid_stats.npz", mu=m, sigma=s)
    fid_stats = FeatureStats.load(tmp_path / "fid_stats.npz")
    assert fid_stats.count is None
    assert fid_stats.frechet_distance(stats) == pytest.approx(0.0, abs=1e-9)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        FeatureStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(DataError, match="missing key"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(ShapeError):
        FeatureStats(mu=np.zeros(3), sigma=np.eye(2))


def test_native_exports_version():
    import resalign

    assert _native.__version__ == resalign.__version__
