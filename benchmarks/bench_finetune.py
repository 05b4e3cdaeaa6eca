"""Time per downstream fine-tuning step: the registered adapter (``Finetuner``) vs a plain module loop.

Usage::

    python benchmarks/bench_finetune.py [--model DIR] [--adapt full] [--steps 20] [--device cpu]

``resalign attack`` fine-tunes through the adapter's functional ``adapt`` (the one the simulated ADAPT
of Alg. 2 runs). The baseline, measured in the same run on the same model and data, is the loop of the
diffusers scripts: the UNet module trained in place by ``torch.optim.AdamW`` (fused where available)
with gradient clipping at 1. Both runs are interleaved in rounds so load changes hit them alike; the
script prints the median seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch


def module_loop(bundle, enc, steps: int, lr: float, seed: int) -> float:
    unet = copy.deepcopy(bundle.unet).float().requires_grad_(True)
    schedule = bundle.noise_schedule()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2, fused=bundle.device.type in ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for i in range(steps):
        j = [i % enc.x0.shape[0]]
        noise, t = schedule.sample(enc.x0[j], gen)
        pred = unet(schedule.add_noise(enc.x0[j], noise, t), t, encoder_hidden_states=enc.cond[j]).sample
        opt.zero_grad(set_to_none=True)
        ((pred - noise) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def adapter_loop(bundle, pairs, adapt: str, steps: int, lr: float, seed: int) -> float:
    from resalign.eval.protocol.finetune import Finetuner, FinetuneSpec, Stage

    ft = Finetuner(bundle, FinetuneSpec(adapt=adapt, steps=steps, lr=lr), [Stage(pairs, steps)], seed=seed)
    start = time.perf_counter()
    ft.run()
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapt", default="full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from bench_solvers import build

    from resalign.eval.protocol.pairs import Pairs, encode_pairs

    bundle = build(args.model, args.device)
    rng = np.random.default_rng(0)
    size = bundle.image_size
    pairs = Pairs(rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8), ["a red circle"] * 8, "bench")
    enc = encode_pairs(bundle, pairs)
    module_loop(bundle, enc, 2, 1e-4, 0), adapter_loop(bundle, pairs, args.adapt, 2, 1e-4, 0)  # warm-up
    ours, base = [], []
    for r in range(args.rounds):
        ours.append(adapter_loop(bundle, pairs, args.adapt, args.steps, 1e-4, r))
        base.append(module_loop(bundle, enc, args.steps, 1e-4, r))
    o, b = statistics.median(ours), statistics.median(base)
    print(f"adapter {args.adapt!r} via Finetuner: {o * 1e3:.1f} ms/step; module + torch.optim.AdamW: "
          f"{b * 1e3:.1f} ms/step; ratio {o / b:.2f}")


if __name__ == "__main__":
    main()
