"""Time per ResAlign outer step with each hypergradient solver (paper, App. E.1: 58 vs 50 min per run).

Usage::

    python benchmarks/bench_solvers.py [--model DIR] [--steps 6] [--solvers richardson,first-order,unrolled]

Every solver runs the same outer steps (same seed: same sampled configurations, batches and noise) on
the same model, with the toy preset's settings (its curvature of Eq. 6 included), and the solvers' steps are interleaved, so the time
ratio isolates the hypergradient estimate even on a machine whose load changes. Without ``--model`` the shipped
toy model is used (or a freshly initialised one of the same size when it is not installed). Data are
procedural toy-world pairs, so no generation is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(model: str | None, device: str):
    from resalign.models.bundle import T2IBundle

    if model:
        return T2IBundle.load(model, device=device)
    try:
        from resalign.models.toy import load_toy

        return load_toy(None, device=device)
    except Exception:  # the toy model is not installed: same architecture, random weights
        from resalign.models.toy import build_bundle

        return build_bundle(seed=0).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=6, help="timed outer steps per solver (after one warm-up step)")
    ap.add_argument("--solvers", default="richardson,first-order")
    ap.add_argument("--K", type=int, default=5)
    ap.add_argument("-J", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from resalign.components import DiffusionContext
    from resalign.core.functional import FunctionalUNet
    from resalign.core.meta import ConfigPool, MethodSettings, PairSet, ResAlign, TrainingData
    from resalign.core.params import Parameterization
    from resalign.data import toy
    from resalign.settings.presets import PRESETS
    from resalign.registry import get_registry

    bundle = build(args.model, args.device)
    bundle.unet.float().requires_grad_(False).eval()
    model = FunctionalUNet(bundle.unet)
    ctx = DiffusionContext(model, model.base_params(), bundle.noise_schedule(), bundle.encode_prompts([""]))

    def pairs(ds):
        x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return PairSet(bundle.encode_images(x).float(), bundle.encode_prompts(list(ds.prompts)).float(), list(ds.prompts))

    data = TrainingData(harmful=pairs(toy.contamination_pool(64)), preserve=pairs(toy.benign_dataset_b(64)),
                        finetune=pairs(toy.make_dataset(64, seed=5)))
    preset = PRESETS["toy"].run
    reg = get_registry()
    names = [s.strip() for s in args.solvers.split(",") if s.strip()]
    trainers = {}
    for name in names:
        options = {"K": args.K} if name == "richardson" else {}
        settings = MethodSettings(beta=preset["beta"], alpha=preset["alpha"], J=args.J, outer_lr=preset["outer_lr"],
                                  harm_batch=preset["harm_batch"], preserve_batch=preset["preserve_batch"],
                                  ft_size=preset["ft_size"], curvature=preset["curvature"],
                                  curvature_samples=preset["curvature_samples"], outer_steps=args.steps + 1, seed=0)
        trainers[name] = ResAlign(
            ctx, Parameterization(preset["params"], ctx.theta0),
            harmful_loss=reg.create("harmful-loss", "ga", preset["loss_options"]["ga"]),
            regularizer=reg.create("regularizer", "distill"), solver=reg.create("solver", name, options),
            pool=ConfigPool(**preset["pool"]), data=data, settings=settings, registry=reg,
        )
    # steps of the solvers interleaved, so that a change in machine load affects all of them alike
    results: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.steps + 1):
        for name in names:
            t0 = time.perf_counter()
            trainers[name].outer_step()
            if i:  # the first step warms up kernels and caches
                results[name].append(time.perf_counter() - t0)
    for name, times in results.items():
        print(f"{name:<12} {statistics.mean(times):7.2f} s/step  (median {statistics.median(times):.2f}, "
              f"n={len(times)}, K={args.K if name == 'richardson' else '-'}, J={args.J}, params={preset['params']})")
    if "richardson" in results and "first-order" in results:
        ratio = statistics.mean(results["richardson"]) / statistics.mean(results["first-order"])
        print(f"richardson / first-order time per outer step: {ratio:.2f}x  (paper, whole SD run: 58/50 = 1.16x)")


if __name__ == "__main__":
    main()
