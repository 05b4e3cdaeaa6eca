"""The compiled inner loop (resalign.core.compiled) against the fast one, and its eager fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from fixtures.tiny import random_batch, tiny_context

from resalign import fastpath
from resalign.components import FinetuneConfig
from resalign.core import compiled, tree
from resalign.core.problem import SimulationData, simulate
from resalign.registry import get_registry


@pytest.fixture
def path(monkeypatch):
    """Select a path for the test, with compilation allowed (the suite turns it off: conftest.py)."""
    monkeypatch.setenv(compiled.ENV, "1")
    monkeypatch.setattr(compiled, "_failed", None)
    before = fastpath.current()
    yield fastpath.use
    fastpath.use(before)


def rel(a: dict, b: dict) -> float:
    return tree.norm(tree.add(a, b, -1.0)) / tree.norm(b)


def _simulate(ctx, loss: str = "prior_preservation", steps: int = 6, dtype=torch.float32):
    reg = get_registry()
    data = SimulationData(ft=random_batch(4, seed=1, prior=True, dtype=dtype), harm=random_batch(2, seed=2, dtype=dtype))
    cfg = FinetuneConfig(adapter="full", lr=1e-3, steps=steps, optimizer="adam", finetune_loss=loss, batch_size=1)
    return simulate(ctx, tree.detach(ctx.theta0), cfg, data, adapter=reg.create("adapter", "full", {}),
                    finetune_loss=reg.create("finetune-loss", loss, {}), harmful_loss=reg.create("harmful-loss", "ga", {}),
                    seed=3, solver=reg.create("solver", "richardson", {"K": 3}), curvature="gauss-newton")


def test_the_compiled_path_is_opt_in_and_builds_on_the_fast_one():
    assert fastpath.PATHS[0] == "fast"
    for name, fast, compiling in (("compiled", True, True), ("fast", True, False), ("reference", False, False)):
        before = fastpath.current()
        fastpath.use(name)
        try:
            assert (fastpath.enabled(), fastpath.compiling()) == (fast, compiling)
        finally:
            fastpath.use(before)


@pytest.mark.slow
def test_a_compiled_simulation_equals_the_fast_one_and_repeats_bitwise(path):
    """θ_FT, L_harm(θ_FT) and the hypergradient of a simulation whose ADAPT steps ran compiled equal
    the fast path's to 1e-6 relative in float64, and are the same bits when run again (what a
    resumed run and the ranks of a split run rely on). A compiled step's gradient differs from the
    eager one by about 1e-9 relative even in float64 (the model computes some steps, e.g. its
    timestep embedding, in float32, which Inductor's kernels round differently); six Adam steps
    carry that to θ_FT at about 1e-9. (In float32 the same rounding is ~1e-6 of a gradient's scale,
    and Adam's g/(|g| + ε) turns it into steps of ±lr on the entries whose gradient is below it:
    docs/performance.md.)"""
    ctx = tiny_context(dtype=torch.float64)
    calls = []
    original = compiled.CompiledCall.__call__

    def counting(self, *args):
        out = original(self, *args)
        calls.append(out is not None)
        return out

    out = {}
    for name in ("fast", "compiled", "compiled"):
        path(name)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compiled.CompiledCall, "__call__", counting)
            out.setdefault(name, []).append(_simulate(ctx, dtype=torch.float64))
    assert len(calls) == 12 and all(calls), "the ADAPT steps did not run compiled"
    assert compiled.failure() is None
    (h0, d0), = out["fast"]
    (h1, d1), (h2, d2) = out["compiled"]
    assert all(torch.equal(h1[k], h2[k]) for k in h1) and d1 == d2
    assert rel(h1, h0) < 1e-6
    assert d1["harm_ft"] == pytest.approx(d0["harm_ft"], rel=1e-9)
    assert d1["delta_norm"] == pytest.approx(d0["delta_norm"], rel=1e-7)


@pytest.mark.parametrize("where", ["call", "setup"])
def test_a_failing_backend_falls_back_to_the_fast_path_once_with_a_warning(path, monkeypatch, where):
    """A compiler that fails (every compiled call raises, or ``torch.compile`` refuses the platform)
    is reported once; the simulation then equals the fast path's bit for bit, and later calls do not
    try again."""
    ctx = tiny_context()
    path("fast")
    h_fast, d_fast = _simulate(ctx, "denoise", 3)
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("InductorError: no working C++ compiler")

    monkeypatch.setattr(torch, "compile", (lambda fn, **options: broken) if where == "call" else broken)
    path("compiled")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        h, d = _simulate(tiny_context(), "denoise", 3)
        _simulate(tiny_context(), "denoise", 3)
    assert len(attempts) == 1
    assert sum(w.category is RuntimeWarning and "torch.compile is unavailable" in str(w.message) for w in seen) == 1
    assert "no working C++ compiler" in compiled.failure()
    assert all(torch.equal(h[k], h_fast[k]) for k in h) and d == d_fast


def test_compilation_turned_off_runs_the_fast_path_without_trying(path, monkeypatch):
    ctx = tiny_context()
    path("fast")
    h_fast, d_fast = _simulate(ctx, "denoise", 3)
    monkeypatch.setenv(compiled.ENV, "0")
    monkeypatch.setattr(compiled, "CompiledCall", None)  # any attempt would fail loudly
    path("compiled")
    h, d = _simulate(ctx, "denoise", 3)
    assert all(torch.equal(h[k], h_fast[k]) for k in h) and d == d_fast


@pytest.mark.slow
def test_compiled_runs_split_over_two_ranks_and_resumed_after_a_kill_equal_one_process(tiny_toy_dir, tmp_path,
                                                                                       monkeypatch):
    """The equality guarantees of tests/test_distributed_run.py on the compiled path: a two-rank run
    gives the single-process weights (to the order of the hypergradient sums), and a run killed after
    a checkpoint resumes to the uninterrupted run's weights bit for bit (each process compiles, or
    loads from Inductor's cache, the same kernels)."""
    from test_distributed_run import _kill_after_checkpoint, _ok, _run_args, _torchrun, _weights

    import sys

    monkeypatch.setenv(compiled.ENV, "1")
    monkeypatch.setenv(fastpath.ENV, "compiled")
    args = ["--outer-steps", "2", "--set", "checkpoint_every=1", "--set", "quick_eval=0"]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _ok([sys.executable, "-m", "resalign", *_run_args(tiny_toy_dir, one, *args)], timeout=600)
    _ok(_torchrun("-m", "resalign", *_run_args(tiny_toy_dir, two, *args)), timeout=600)
    a, b = _weights(one), _weights(two)
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    assert diff <= 1e-6 * sum(float(t.double().pow(2).sum()) for t in a.values()) ** 0.5
    cmd = [sys.executable, "-m", "resalign", *_run_args(tiny_toy_dir, killed, *args)]
    assert _kill_after_checkpoint(cmd, killed, 1, timeout=600) < 2
    _ok([sys.executable, "-m", "resalign", "run", "--resume", "--out", str(killed), "--no-progress"], timeout=600)
    c = _weights(killed)
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the runs did compile: the fast path's weights differ from the compiled ones by float rounding
    monkeypatch.setenv(fastpath.ENV, "fast")
    _ok([sys.executable, "-m", "resalign", *_run_args(tiny_toy_dir, tmp_path / "fast", *args)], timeout=600)
    f = _weights(tmp_path / "fast")
    assert any(not torch.equal(a[k], f[k]) for k in a)
