"""Batched generation with classifier-free guidance, against diffusers' own pipeline as reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resalign.eval.scoring.generate import generate, image_seeds
from resalign.models import toy


@pytest.fixture(scope="module")
def pixel_bundle():
    return toy.build_bundle(seed=0, channels=(8, 16))


@pytest.fixture(scope="module")
def latent_bundle():
    """A Stable-Diffusion-shaped bundle (4-channel latents, a tiny AutoencoderKL)."""
    from diffusers import AutoencoderKL

    from resalign.models.bundle import T2IBundle

    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    text = toy.build_text_encoder(tok, seed=1)
    unet = toy.build_unet(seed=2, sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    ).eval()
    _, ddim = toy.build_schedulers()
    ddim = type(ddim).from_config(ddim.config, clip_sample=False)
    for m in (unet, text, vae):
        m.requires_grad_(False).eval()
    return T2IBundle(unet, text, tok, ddim, vae=vae, source="tiny-sd")


PROMPTS = ["a red circle", "a small shiny blue shape on grey", "a large green ring"]


def test_shapes_dtype_and_order(pixel_bundle):
    calls = []
    out = generate(pixel_bundle, PROMPTS, images_per_prompt=2, steps=3, batch_size=4,
                   progress=lambda d, t: calls.append((d, t)))
    assert out.shape == (6, 16, 16, 3) and out.dtype == np.uint8
    assert calls == [(4, 6), (6, 6)]
    assert generate(pixel_bundle, [], steps=2).shape == (0, 16, 16, 3)


def test_images_do_not_depend_on_batching(pixel_bundle):
    a = generate(pixel_bundle, PROMPTS, images_per_prompt=2, steps=3, batch_size=1, seed=5)
    b = generate(pixel_bundle, PROMPTS, images_per_prompt=2, steps=3, batch_size=32, seed=5)
    np.testing.assert_array_equal(a, b)


def test_per_prompt_seeds_and_guidance(pixel_bundle):
    assert image_seeds(2, 3, 10) == [10, 11, 12, 13, 14, 15]
    assert image_seeds(2, 2, [7, 100]) == [7, 8, 100, 101]
    both = generate(pixel_bundle, PROMPTS[:2], steps=3, seed=[11, 22], guidance=[1.0, 7.5])
    first = generate(pixel_bundle, PROMPTS[:1], steps=3, seed=11, guidance=1.0)
    second = generate(pixel_bundle, PROMPTS[1:2], steps=3, seed=22, guidance=7.5)
    np.testing.assert_array_equal(both, np.concatenate([first, second]))
    assert not np.array_equal(second, generate(pixel_bundle, PROMPTS[1:2], steps=3, seed=22, guidance=1.0))


def test_unet_params_are_used_and_the_module_is_untouched(pixel_bundle):
    own = {k: v.detach().clone() for k, v in pixel_bundle.unet.named_parameters()}
    base = generate(pixel_bundle, PROMPTS, steps=3)
    same = generate(pixel_bundle, PROMPTS, steps=3, unet_params=own)
    np.testing.assert_array_equal(base, same)
    other = {k: v * 0.5 for k, v in own.items()}
    changed = generate(pixel_bundle, PROMPTS, steps=3, unet_params=other)
    assert not np.array_equal(base, changed)
    for k, v in pixel_bundle.unet.named_parameters():
        assert torch.equal(v, own[k]), k


def test_bad_arguments_are_config_errors(pixel_bundle):
    from resalign.errors import ConfigError

    with pytest.raises(ConfigError, match="guidance: got 2 values for 3 prompts"):
        generate(pixel_bundle, PROMPTS, steps=2, guidance=[1.0, 2.0])
    with pytest.raises(ConfigError, match="steps"):
        generate(pixel_bundle, PROMPTS, steps=0)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_latent_bundle_matches_the_diffusers_pipeline(latent_bundle, guidance):
    """Same latents, same scheduler: our batched CFG loop equals StableDiffusionPipeline's output."""
    from diffusers import StableDiffusionPipeline

    b = latent_bundle
    pipe = StableDiffusionPipeline(
        vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
        scheduler=type(b.scheduler).from_config(b.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS[:2]
    ours = generate(b, prompts, steps=4, guidance=guidance, seed=3)
    latents = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s))
                         for s in image_seeds(len(prompts), 1, 3)])
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=guidance, latents=latents, output_type="np",
               height=16, width=16).images
    assert ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours.astype(float), ref * 255.0, atol=1.0)
