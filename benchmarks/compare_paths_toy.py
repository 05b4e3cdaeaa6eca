"""How far the inner-loop paths' simulations lie apart on the toy model (float32, same θ and seed).

Usage::

    python benchmarks/compare_paths_toy.py [--paths fast,compiled] [--data-dir DIR]

For each configuration of issue #26's pinned pool (:data:`bench_toy_step.PINNED`), one
:func:`~resalign.core.problem.simulate` per path from the trainer's θ with the outer step 0 data and
seed, the solver's warm start cleared before each (cold power iterations): prints, per configuration,
the relative differences of the hypergradient, L_harm(θ_FT) and ‖θ_FT − θ‖ of the second path against
the first, and both λ_max (docs/performance.md, "The compiled path").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_toy_step as bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default="fast,compiled")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.threads, args.outer_steps = 1, 1
    torch.set_num_threads(1)
    from resalign import fastpath
    from resalign.core import tree
    from resalign.core.problem import simulate

    first, second = args.paths.split(",")
    _, _, prep = bench.build(args)
    tr = prep.trainer
    s = tr.settings
    for label, c in bench.configs(tr).items():
        w, data, seed = bench.sim_inputs(tr, c)
        out = {}
        for p in (first, second):
            fastpath.use(p)
            tr.solver.eigvecs.clear()
            tr.solver.lambdas.clear()
            out[p] = simulate(tr.ctx, w, c, data, adapter=tr.adapter(c), finetune_loss=tr.finetune_loss(c),
                              harmful_loss=tr.harmful_loss, solver=tr.solver, seed=seed, gamma=s.proximity(c),
                              curvature=s.curvature, cache={}, max_ft_loss_growth=s.max_ft_loss_growth,
                              curvature_samples=s.curvature_samples)
        (h0, d0), (h1, d1) = out[first], out[second]
        print(json.dumps({
            "config": label,
            "hypergrad_rel": tree.norm(tree.add(h1, h0, -1.0)) / tree.norm(h0),
            "harm_ft_rel": abs(d1["harm_ft"] - d0["harm_ft"]) / abs(d0["harm_ft"]),
            "delta_norm_rel": abs(d1["delta_norm"] - d0["delta_norm"]) / d0["delta_norm"],
            "lambda_max": [d0.get("lambda_max"), d1.get("lambda_max")],
        }))


if __name__ == "__main__":
    main()
