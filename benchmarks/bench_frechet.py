"""Fréchet distance at d = 2048: resalign's Rust kernel vs the formulas of pytorch-fid
(scipy sqrtm of Σ1Σ2), torch-fidelity (eigvals of Σ1Σ2) and numpy (Cholesky + eigvalsh).

    python benchmarks/bench_frechet.py [--dim 2048] [--blas-threads 1] [--skip-sqrtm]

Prints one line per method, the ratios, and finally one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--samples", type=int, default=0, help="samples per set (default: dim + 1000)")
    p.add_argument("--blas-threads", type=int, default=1, help="numpy/scipy BLAS threads")
    p.add_argument("--repeats", type=int, default=2, help="repeats of the fast methods (best kept)")
    p.add_argument("--skip-sqrtm", action="store_true", help="skip pytorch-fid's sqrtm formula")
    return p.parse_args()


def best_time(fn, repeats):
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> None:
    args = parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.blas_threads)
    import warnings

    import numpy as np
    import scipy.linalg

    from resalign import _native

    d = args.dim
    n = args.samples or d + 1000
    rng = np.random.default_rng(0)

    def stats(shift):
        x = rng.standard_normal((n, d)).astype(np.float32)
        x = x * rng.uniform(0.2, 2.0, size=d).astype(np.float32) + shift
        acc = _native.FeatureAccumulator(d)
        acc.update(x)
        return acc.mean(), acc.covariance()

    mu1, s1 = stats(0.0)
    mu2, s2 = stats(0.1)
    diff = mu1 - mu2
    base = diff @ diff + np.trace(s1) + np.trace(s2)

    def pytorch_fid():  # fid_score.calculate_frechet_distance
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
        return base - 2 * np.trace(covmean.real)

    def torch_fidelity():  # metric_fid.fid_statistics_to_metric
        return base - 2 * np.sum(np.sqrt(np.linalg.eigvals(s1.dot(s2)).astype("complex128")).real)

    def numpy_cholesky():
        lower = np.linalg.cholesky(s1)
        eig = np.linalg.eigvalsh(lower.T @ s2 @ lower)
        return base - 2 * np.sqrt(np.clip(eig, 0, None)).sum()

    results = {}
    for threads in (1, 2):
        t, v = best_time(lambda: _native.frechet_distance(mu1, s1, mu2, s2, threads=threads), args.repeats)
        results[f"resalign_rust_{threads}t"] = (t, v)
        print(f"resalign (Rust, faer, {threads} thread{'s' if threads > 1 else ''}): {t:8.3f} s  FD={v:.10f}")
    t, v = best_time(numpy_cholesky, args.repeats)
    results["numpy_cholesky_eigvalsh"] = (t, v)
    print(f"numpy Cholesky + eigvalsh:            {t:8.3f} s  FD={v:.10f}")
    t, v = best_time(torch_fidelity, 1)
    results["torch_fidelity_eigvals"] = (t, v)
    print(f"torch-fidelity eigvals(S1 S2):        {t:8.3f} s  FD={v:.10f}")
    if not args.skip_sqrtm:
        t, v = best_time(pytorch_fid, 1)
        results["pytorch_fid_sqrtm"] = (t, v)
        print(f"pytorch-fid sqrtm(S1 S2):             {t:8.3f} s  FD={v:.10f}")

    default = _native.DEFAULT_THREADS
    rust = results[f"resalign_rust_{default}t"][0]
    ratios = {f"{k}_over_rust": results[k][0] / rust for k in results if not k.startswith("resalign")}
    ratios["rust_1t_over_2t"] = results["resalign_rust_1t"][0] / results["resalign_rust_2t"][0]
    ref = results["numpy_cholesky_eigvalsh"][1]
    max_rel = max(abs(v - ref) / abs(ref) for _, v in results.values())
    for k, r in ratios.items():
        print(f"{k}: {r:.2f}x")
    print(f"max relative difference between methods: {max_rel:.2e}")
    print(
        json.dumps(
            {
                "benchmark": "frechet",
                "dim": d,
                "samples": n,
                "blas_threads": args.blas_threads,
                "default_rust_threads": default,
                "seconds": {k: round(t, 4) for k, (t, _) in results.items()},
                "ratios": {k: round(r, 3) for k, r in ratios.items()},
                "max_rel_diff": max_rel,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
            }
        )
    )


if __name__ == "__main__":
    main()
