"""ResAlign outer steps of the ``sd`` preset on an SD-1.5-shaped model, one GPU, bf16: peak memory and time.

Builds an SD-1.5-shaped UNet (860M parameters), CLIP text encoder and VAE from their configs (random
weights, nothing downloaded), encodes random 512 × 512 images and random prompts with them (the data
of a run; the run's own data generation is not timed), then runs outer steps of Alg. 2 with the
``sd`` preset's settings and pool (J = 3, Richardson K = 5, Gauss–Newton curvature on
``curvature_samples`` pairs), bf16 autocast with fp32 master weights and block checkpointing. Prints
each step's time, the peak GPU memory and the projected time of a default run (the preset's
``outer_steps`` times the mean time of the steps after the first).

On a GPU machine (Python with torch, transformers, peft, safetensors, numpy and pluggy; diffusers
given as a wheel, e.g. ``diffusers-0.42.1-py3-none-any.whl``), from the repository root::

    pip install --no-deps diffusers-*.whl        # or unpack the wheel into DIR and prepend DIR to PYTHONPATH
    PYTHONPATH=. python benchmarks/gpu_sd.py      # [--steps 4] [--budget-s 480] [--no-checkpointing]

It stops taking steps once another one would pass ``--budget-s`` (so it ends within 10 minutes on one
H100/H200). Smoke mode, on the CPU with tiny widths (not part of the test suite)::

    PYTHONPATH=. python benchmarks/gpu_sd.py --device cpu --tiny --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from bench_memory import unet_config

#: SD-1.5's CLIP ViT-L/14 text encoder and its VAE (the configs of the released model)
TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, norm_num_groups=32, sample_size=512)
VAE_SCALE = 0.18215


def build(tiny: bool, device: str):
    """UNet, text encoder and VAE of SD-1.5's shapes (``tiny``: widths 32, one text layer, 64 px images)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    width, latent = (32, 8) if tiny else (320, 64)
    unet = UNet2DConditionModel(**unet_config(width, latent))
    text = dict(TEXT_ENCODER, num_hidden_layers=1, intermediate_size=256) if tiny else TEXT_ENCODER
    vae = dict(VAE, block_out_channels=(32,) * 4, layers_per_block=1, sample_size=8 * latent) if tiny else VAE
    return (unet.to(device), CLIPTextModel(CLIPTextConfig(**text)).to(device), AutoencoderKL(**vae).to(device),
            8 * latent)


@torch.no_grad()
def encode_data(text_encoder, vae, pixels: int, n: int, device: str, dtype, seed: int = 0):
    """Prompt-image pairs in model space from random images and random token ids."""
    from resalign.core.meta import PairSet

    g = torch.Generator().manual_seed(seed)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        images = (torch.rand(n, 3, pixels, pixels, generator=g) * 2 - 1).to(device)
        latents = torch.cat([vae.encode(images[i:i + 1]).latent_dist.mean for i in range(n)]) * VAE_SCALE
        ids = torch.randint(0, text_encoder.config.vocab_size, (n, 77), generator=g).to(device)
        cond = text_encoder(ids).last_hidden_state
    return PairSet(latents.float(), cond.float(), [f"prompt {i}" for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--steps", type=int, default=4, help="outer steps at most (the first is not averaged)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="take no step that would end after this")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (a CPU smoke run)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("-J", type=int, default=None, help="simulations per outer step (default: the preset's)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    from diffusers import DDPMScheduler

    from resalign.components import DiffusionContext
    from resalign.core.functional import FunctionalUNet
    from resalign.core.meta import ConfigPool, MethodSettings, ResAlign, TrainingData
    from resalign.core.params import Parameterization
    from resalign.models.bundle import DTYPES
    from resalign.models.diffusion import NoiseSchedule
    from resalign.settings.presets import PRESETS
    from resalign.registry import get_registry

    cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype]
    unet, text_encoder, vae, pixels = build(args.tiny, args.device)
    data = TrainingData(*(encode_data(text_encoder, vae, pixels, 8, args.device, dtype, seed) for seed in (1, 2, 3)))
    uncond = encode_data(text_encoder, vae, pixels, 1, args.device, dtype, 4).cond
    del text_encoder, vae
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    preset = PRESETS["sd"].run
    fields = {f.name for f in dataclasses.fields(MethodSettings)}
    settings = MethodSettings(**{k: v for k, v in preset.items() if k in fields})
    if args.J is not None:
        settings.J = args.J
    unet = unet.float().requires_grad_(False).eval()
    model = FunctionalUNet(unet, compute_dtype=None if args.dtype == "fp32" else dtype,
                           checkpointing=not args.no_checkpointing)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                                          beta_start=0.00085, beta_end=0.012))
    ctx = DiffusionContext(model, model.base_params(), schedule, uncond)
    reg = get_registry()
    loss_options = preset["loss_options"].get(preset["loss"], {})
    trainer = ResAlign(ctx, Parameterization(preset["params"], ctx.theta0),
                       harmful_loss=reg.create("harmful-loss", preset["loss"], loss_options),
                       regularizer=reg.create("regularizer", "distill"), solver=reg.create("solver", "richardson"),
                       pool=ConfigPool(**preset["pool"]), data=data, settings=settings, registry=reg)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet {n_params / 1e6:.0f}M parameters, latents {pixels // 8}x{pixels // 8}, {args.dtype} autocast, "
          f"checkpointing {'off' if args.no_checkpointing else 'on'}, J={settings.J}, device {args.device}", flush=True)
    times: list[float] = []
    for i in range(args.steps):
        if times and time.perf_counter() - t_start + max(times) > args.budget_s:
            print(f"stopping after {i} steps: another would pass --budget-s {args.budget_s:g}")
            break
        t0 = time.perf_counter()
        metrics = trainer.outer_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        sims = ", ".join(f"{s['config']}" + (" (dropped)" if "dropped" in s else "") for s in metrics.get("simulations", []))
        peak = f", peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        print(f"step {i + 1}: {times[-1]:.1f} s{peak}, simulations: {sims}", flush=True)
    timed = times[1:] or times
    per_step = statistics.mean(timed)
    result = {
        "benchmark": "gpu_sd", "device": torch.cuda.get_device_name() if cuda else args.device,
        "params": n_params, "dtype": args.dtype, "checkpointing": not args.no_checkpointing, "J": settings.J,
        "steps": len(times), "seconds_per_step": times, "mean_seconds_per_step": per_step,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "projected_run_hours": per_step * settings.outer_steps / 3600, "outer_steps": settings.outer_steps,
        "total_s": time.perf_counter() - t_start,
    }
    print(f"mean {per_step:.1f} s per outer step over {len(timed)} step(s); projected default run "
          f"({settings.outer_steps} outer steps, without data generation): {result['projected_run_hours']:.2f} h")
    if cuda:
        print(f"peak GPU memory: {result['peak_allocated_gib']:.1f} GiB allocated, "
              f"{result['peak_reserved_gib']:.1f} GiB reserved")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
