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

``--sdxl`` runs the ``sdxl`` preset on an SDXL-shaped model instead: SDXL's UNet (2.6 B parameters,
``text_time`` added embedding), its two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with its
projection; penultimate hidden states side by side, the second's pooled output, time ids of 1024 px)
and its VAE (kept in fp32, ``force_upcast``), 1024 × 1024 images::

    PYTHONPATH=. python benchmarks/gpu_sd.py --sdxl --steps 3      # CPU smoke: --device cpu --tiny --sdxl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from bench_memory import sdxl_text_widths, sdxl_unet_config, unet_config

#: SD-1.5's CLIP ViT-L/14 text encoder and its VAE (the configs of the released model)
TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, norm_num_groups=32, sample_size=512)
VAE_SCALE = 0.18215
#: SDXL's second text encoder (OpenCLIP ViT-bigG/14 with its projection) and VAE scaling factor
TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_VAE_SCALE = 0.13025


def build_sdxl(tiny: bool, device: str):
    """UNet, both text encoders and VAE of SDXL's shapes (``tiny``: widths 32, 64 px images, one text
    layer each, the text widths scaled as :func:`bench_memory.sdxl_text_widths`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    width, latent = (32, 8) if tiny else (320, 128)
    unet = UNet2DConditionModel(**sdxl_unet_config(width, latent))
    te1_cfg, te2_cfg = TEXT_ENCODER, TEXT_ENCODER_2
    if tiny:  # one layer each, the widths of the tiny UNet (hidden states side by side, pooled projection)
        text, pooled, _ = sdxl_text_widths(width)
        small = dict(num_hidden_layers=1, intermediate_size=256, num_attention_heads=2)
        te1_cfg = dict(TEXT_ENCODER, **small, hidden_size=text - pooled, projection_dim=text - pooled)
        te2_cfg = dict(TEXT_ENCODER_2, **small, hidden_size=pooled, projection_dim=pooled)
    te1 = CLIPTextModel(CLIPTextConfig(**te1_cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    vae = dict(VAE, force_upcast=True, scaling_factor=SDXL_VAE_SCALE, sample_size=1024)
    vae = dict(vae, block_out_channels=(32,) * 4, layers_per_block=1, sample_size=8 * latent) if tiny else vae
    return unet.to(device), (te1.to(device), te2.to(device)), AutoencoderKL(**vae).to(device), 8 * latent


@torch.no_grad()
def encode_sdxl_data(text_encoders, vae, pixels: int, n: int, device: str, dtype, seed: int = 0):
    """SDXL prompt-image pairs from random images and token ids: latents through the fp32 VAE, the
    Conditioning of StableDiffusionXLPipeline.encode_prompt (penultimate hidden states of both encoders
    side by side, the second's projected pooled output, time ids (pixels, pixels, 0, 0, pixels, pixels))."""
    from resalign.components import Conditioning
    from resalign.core.meta import PairSet

    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, pixels, pixels, generator=g) * 2 - 1).to(device)
    latents = torch.cat([vae.encode(images[i:i + 1]).latent_dist.mean for i in range(n)]) * vae.config.scaling_factor
    ids = torch.randint(0, text_encoders[0].config.vocab_size, (n, 77), generator=g).to(device)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        outs = [te(ids, output_hidden_states=True) for te in text_encoders]
    hidden = torch.cat([o.hidden_states[-2].float() for o in outs], dim=-1)
    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32, device=device).expand(n, 6)
    return PairSet(latents.float(), Conditioning(hidden, outs[1][0].float(), time_ids), [f"prompt {i}" for i in range(n)])


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
    ap.add_argument("--sdxl", action="store_true", help="an SDXL-shaped model and the sdxl preset (1024 px)")
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
    build_fn, encode_fn = (build_sdxl, encode_sdxl_data) if args.sdxl else (build, encode_data)
    unet, text_encoder, vae, pixels = build_fn(args.tiny, args.device)
    data = TrainingData(*(encode_fn(text_encoder, vae, pixels, 8, args.device, dtype, seed) for seed in (1, 2, 3)))
    uncond = encode_fn(text_encoder, vae, pixels, 1, args.device, dtype, 4).cond
    del text_encoder, vae
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    preset = PRESETS["sdxl" if args.sdxl else "sd"].run
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
        "benchmark": "gpu_sd", "model": "sdxl" if args.sdxl else "sd15", "device": torch.cuda.get_device_name() if cuda else args.device,
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
