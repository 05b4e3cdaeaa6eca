"""Batched text-to-image generation with classifier-free guidance, for any :class:`T2IBundle`.

Works for pixel-space bundles (the toy world: ``vae is None``) and latent bundles (Stable Diffusion:
latents decoded through the VAE); for SDXL the negative prompt's pooled embedding and time ids guide
with its hidden states (a :class:`~resalign.components.Conditioning`), as in
``StableDiffusionXLPipeline``. Every image has its own initial noise drawn from its own seed, so an
image does not depend on the batch it was generated in, and I2P-style per-prompt seeds and guidance
scales are honoured.

Under ``torchrun`` (``distribute=True``) rank r generates the batches b ≡ r (mod world size) and the
images are gathered on every rank: each batch holds the same images as in one process, so the result
is the single-process one, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from resalign import distributed
from resalign.components import unet_kwargs
from resalign.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from resalign.models.bundle import T2IBundle

#: ``progress(done, total)``: images finished so far, out of all images.
ProgressFn = Callable[[int, int], None]


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ConfigError(f"{name}: got {len(values)} values for {n} prompts")
    return values


def image_seeds(n_prompts: int, images_per_prompt: int, seed: int | Sequence[int] = 0) -> list[int]:
    """The seed of every image, prompt-major: image j of prompt p gets ``seed_p + j``.

    With one integer ``seed``, prompt p's seed is ``seed + p * images_per_prompt`` (all images distinct);
    with a sequence (I2P's ``evaluation_seed``), prompt p's seed is ``seed[p]``.
    """
    if isinstance(seed, (int, np.integer)):
        base = [int(seed) + p * images_per_prompt for p in range(n_prompts)]
    else:
        base = [int(s) for s in _per_prompt(seed, n_prompts, "seed")]
    return [b + j for b in base for j in range(images_per_prompt)]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, 3, H, W) -> uint8 RGB (B, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _to_float(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, 3, H, W) -> float32 RGB in [0, 1] (B, H, W, 3)."""
    x = (images.detach().float() / 2 + 0.5).clamp(0, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], device, dtype) -> torch.Tensor:
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn((1, *shape), generator=g, dtype=torch.float32))
    return torch.cat(out).to(device=device, dtype=dtype)


@torch.no_grad()
def generate(
    bundle: T2IBundle,
    prompts: Sequence[str],
    *,
    images_per_prompt: int = 1,
    steps: int = 20,
    guidance: float | Sequence[float] = 4.0,
    seed: int | Sequence[int] = 0,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    unet_params: Mapping[str, torch.Tensor] | None = None,
    negative_prompt: str = "",
    distribute: bool = False,
    output_type: str = "uint8",
) -> np.ndarray:
    """Generate ``images_per_prompt`` images for every prompt; uint8 RGB (N, H, W, 3), prompt-major.

    ``guidance`` and ``seed`` are one value or one per prompt (see :func:`image_seeds`). Sampling
    uses the bundle's scheduler (DDIM for the toy model) for ``steps`` steps, with classifier-free
    guidance ε_u + w (ε_c − ε_u) against ``negative_prompt`` (empty by default). ``unet_params``
    evaluates the UNet at other parameters (name -> tensor, e.g. θ from an unlearning run) through
    :func:`torch.func.functional_call`, leaving the module's own weights untouched. ``distribute``
    divides the batches between the ranks of a ``torchrun`` job (every rank must call it); ``progress``
    then counts this rank's images. ``output_type="float"`` returns the decoded images in [0, 1],
    float32 (as diffusers' ``output_type="np"``) instead of uint8.
    """
    prompts = list(prompts)
    if images_per_prompt < 1:
        raise ConfigError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if output_type not in ("uint8", "float"):
        raise ConfigError(f"output_type {output_type!r}: expected 'uint8' or 'float'")
    to_array = to_uint8 if output_type == "uint8" else _to_float
    n_prompts = len(prompts)
    guid = [float(g) for g in _per_prompt(guidance, n_prompts, "guidance")]
    seeds = image_seeds(n_prompts, images_per_prompt, seed)
    all_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    all_guid = [g for g in guid for _ in range(images_per_prompt)]
    total = len(all_prompts)
    h = bundle.image_size
    if total == 0:
        return np.zeros((0, h, h, 3), np.uint8 if output_type == "uint8" else np.float32)

    unet = bundle.unet
    device, dtype = bundle.device, bundle.dtype
    if unet_params is not None:
        from torch.func import functional_call

        params = dict(unet_params)

        def eps_fn(x, t, c):
            return functional_call(unet, params, (x, t), unet_kwargs(c)).sample
    else:

        def eps_fn(x, t, c):
            return unet(x, t, **unet_kwargs(c)).sample

    # Text embeddings: each distinct prompt once, plus the negative / unconditional prompt.
    distinct = sorted(set(all_prompts))
    index = {p: i for i, p in enumerate(distinct)}
    cond_all = bundle.encode_prompts(distinct + [negative_prompt])
    uncond = cond_all[-1:]

    starts = list(range(0, total, batch_size))
    mine = distributed.my_indices(len(starts)) if distribute else list(range(len(starts)))
    mine_total = sum(min(starts[b] + batch_size, total) - starts[b] for b in mine)
    was_training = unet.training
    unet.eval()
    out: list[tuple[int, np.ndarray]] = []
    done = 0
    try:
        for b_index in mine:
            start = starts[b_index]
            stop = min(start + batch_size, total)
            b = stop - start
            cond = cond_all[[index[p] for p in all_prompts[start:stop]]]
            g = torch.tensor(all_guid[start:stop], device=device, dtype=dtype).view(-1, 1, 1, 1)
            scheduler = type(bundle.scheduler).from_config(bundle.scheduler.config)
            scheduler.set_timesteps(steps)
            x = _initial_noise(seeds[start:stop], bundle.latent_shape, device, dtype)
            x = x * scheduler.init_noise_sigma
            context = torch.cat([uncond.expand(b, -1, -1), cond])
            for t in scheduler.timesteps:
                xin = scheduler.scale_model_input(torch.cat([x, x]), t)
                eps_u, eps_c = eps_fn(xin, t, context).chunk(2)
                eps = eps_u + g * (eps_c - eps_u)
                x = scheduler.step(eps, t, x).prev_sample
            out.append((b_index, to_array(bundle.decode(x))))
            done += b
            if progress is not None:
                progress(done, mine_total)
    finally:
        unet.train(was_training)
    if distribute:
        return np.concatenate(distributed.gather_items(out, len(starts)))
    return np.concatenate([images for _, images in out])
