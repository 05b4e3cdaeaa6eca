"""SDXL-layout folders: the conditioning (both encoders, pooled embedding, time ids) against diffusers'
own ``StableDiffusionXLPipeline`` and UNet, second order through the SDXL UNet, and the bad-folder errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from resalign.components import Conditioning, DenoiseBatch, DiffusionContext
from resalign.core import tree
from resalign.core.functional import FunctionalUNet
from resalign.errors import ModelLoadError
from resalign.eval.scoring.generate import generate, image_seeds
from resalign.models.bundle import T2IBundle

PROMPTS = ["a red circle", "blue ring"]  # within the tiny tokenizer's 16 tokens


@pytest.fixture(scope="module")
def bundle(tiny_sdxl_dir):
    return T2IBundle.load(tiny_sdxl_dir)


def _pipeline(b, scheduler=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
        tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=scheduler or type(b.scheduler).from_config(b.scheduler.config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompts_encode_as_the_sdxl_pipeline_does(bundle):
    ref = _pipeline(bundle).encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt="")
    hidden, neg_hidden, pooled, neg_pooled = ref
    c, u = bundle.encode_prompts(PROMPTS), bundle.encode_prompts([""])
    assert isinstance(c, Conditioning) and c.hidden.shape == (2, 16, 16 + 24) and c.pooled.shape == (2, 8)
    torch.testing.assert_close(c.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(c.pooled, pooled, rtol=0, atol=0)
    # the negative prompt, encoded by the pipeline in a batch of two (batched kernels' rounding)
    torch.testing.assert_close(u.hidden, neg_hidden[:1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u.pooled, neg_pooled[:1], rtol=1e-6, atol=1e-6)
    # (original size, crop top-left, target size) at the model's resolution, as the pipeline's default
    assert c.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2


def test_conditioning_rows_follow_the_prompt(bundle):
    c, u = bundle.encode_prompts(PROMPTS), bundle.encode_prompts([""])
    both = torch.cat([c, u.expand(2, -1, -1)])
    assert both.shape == (4, 16, 40) and both.pooled.shape == (4, 8) and both.time_ids.shape == (4, 6)
    torch.testing.assert_close(both[torch.tensor([3])].pooled, u.pooled)
    torch.testing.assert_close(both[[1]].hidden, c.hidden[1:])
    first, second = both.chunk(2)
    torch.testing.assert_close(second.pooled, u.pooled.expand(2, -1))
    with pytest.raises(TypeError, match="Conditioning"):
        torch.stack([c, c])


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_matches_the_sdxl_pipeline(bundle, guidance):
    """Same latents, scheduler, guidance and prompts (the negative prompt "" encoded, not zeroed): our
    batched CFG loop equals StableDiffusionXLPipeline's images to 1e-5."""
    ours = generate(bundle, PROMPTS, steps=4, guidance=guidance, seed=3, output_type="float")
    latents = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s))
                         for s in image_seeds(len(PROMPTS), 1, 3)])
    ref = _pipeline(bundle)(PROMPTS, negative_prompt="", num_inference_steps=4, guidance_scale=guidance,
                            latents=latents, output_type="np", height=16, width=16).images
    assert ours.shape == ref.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # the pooled embedding and time ids do condition the images
    assert np.abs(ours - generate(bundle, PROMPTS[::-1], steps=4, guidance=guidance, seed=3,
                                  output_type="float")[::-1]).max() > 1e-4


def _context(bundle, dtype=torch.float32):
    model = FunctionalUNet(bundle.unet.to(dtype))
    return DiffusionContext(model=model, theta0=model.base_params(), schedule=bundle.noise_schedule(),
                            uncond=bundle.encode_prompts([""]).to(dtype))


def test_esd_target_equals_the_diffusers_unet_with_both_encoders(bundle):
    from resalign.losses.harmful import ESD

    ctx = _context(bundle)
    batch = DenoiseBatch(x0=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                         cond=bundle.encode_prompts(PROMPTS), prompts=PROMPTS)
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 700])
    # the reference: the UNet module called directly with each encoder's parts, as the pipeline does
    pipe = _pipeline(bundle)
    hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                                                negative_prompt="")
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                      text_encoder_projection_dim=bundle.text_encoder_2.config.projection_dim)

    def eps(h, p):
        return bundle.unet(x_t, t, encoder_hidden_states=h,
                           added_cond_kwargs={"text_embeds": p, "time_ids": time_ids.expand(2, 6)}).sample

    e_c, e_u = eps(hidden, pooled), eps(neg_hidden, neg_pooled)
    for eta, from_uncond in ((1.0, False), (2.0, True)):
        esd = ESD(ESD.Config(eta=eta, from_uncond=from_uncond))
        expected = (e_u if from_uncond else e_c) - eta * (e_c - e_u)
        torch.testing.assert_close(esd.target(ctx, x_t, t, batch.cond), expected, rtol=1e-5, atol=1e-5)
    # the unconditional prompt's pooled embedding matters: zeroing it changes the target
    zeroed = DiffusionContext(ctx.model, ctx.theta0, ctx.schedule,
                              Conditioning(ctx.uncond.hidden, torch.zeros_like(ctx.uncond.pooled), ctx.uncond.time_ids))
    assert (ESD().target(zeroed, x_t, t, batch.cond) - e_u).abs().max() > 1e-4


def test_hvp_through_the_sdxl_unet_matches_float64_finite_differences(tiny_sdxl_dir):
    from fixtures.tiny import hvp_and_finite_difference

    from resalign.losses._common import denoising_loss

    b = T2IBundle.load(tiny_sdxl_dir)
    ctx = _context(b, torch.float64)
    batch = DenoiseBatch(x0=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                         cond=b.encode_prompts(PROMPTS).to(torch.float64))

    def loss(p):
        return denoising_loss(ctx, p, batch, torch.Generator().manual_seed(0))

    theta = tree.detach(ctx.theta0)
    hv, fd = hvp_and_finite_difference(loss, theta)
    cos = float(tree.dot(hv, fd)) / (tree.norm(hv) * tree.norm(fd))
    assert cos > 0.999
    assert abs(tree.norm(hv) - tree.norm(fd)) / tree.norm(fd) < 1e-3
    # the added (pooled + time ids) embedding is on the second-order path
    assert tree.norm({k: hv[k] for k in hv if k.startswith("add_embedding.")}) > 0


def test_missing_second_text_encoder_is_named(tiny_sdxl_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_sdxl_dir, bad)
    shutil.rmtree(bad / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="lacks text_encoder_2") as err:
        T2IBundle.load(bad)
    assert "\n" not in str(err.value)


def test_time_ids_size_mismatch_is_named(tiny_sdxl_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_sdxl_dir, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["addition_time_embed_dim"] = 6
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unet/config.json.*projection_class_embeddings_input_dim.*time_ids") as err:
        T2IBundle.load(bad)
    assert "\n" not in str(err.value)


def test_saved_folder_loads_with_the_sdxl_pipeline(bundle, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = bundle.save(tmp_path / "saved")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.text_encoder_2.config.hidden_size == 24
    again = T2IBundle.load(out)
    torch.testing.assert_close(again.encode_prompts(PROMPTS).pooled, bundle.encode_prompts(PROMPTS).pooled)
    image = pipe("a dog", num_inference_steps=2, output_type="np", height=16, width=16).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_every_loss_switches_the_pooled_embedding_and_time_ids_with_the_prompt(bundle):
    """GA, CA (anchor prompts), distillation, denoising and DreamBooth's prior pairs (one joint call on
    the fast path) against the diffusers UNet called with each prompt's own parts."""
    from resalign import fastpath
    from resalign.registry import get_registry

    ctx = _context(bundle)
    g = torch.Generator().manual_seed(0)
    x0, x0_prior = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    anchors = ["a blue circle", "a cat"]
    batch = DenoiseBatch(x0=x0, cond=bundle.encode_prompts(PROMPTS), prompts=PROMPTS,
                         anchor_cond=bundle.encode_prompts(anchors),
                         prior=DenoiseBatch(x0=x0_prior, cond=bundle.encode_prompts(["a dog", "a dog"])))
    params = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in ctx.theta0.items()}
    pipe = _pipeline(bundle)

    def parts(prompts):
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        return hidden, pooled

    def eps(p, x_t, t, prompts):
        from torch.func import functional_call

        hidden, pooled = parts(prompts)
        ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(len(prompts), 6)
        return functional_call(bundle.unet, p, (x_t, t), {"encoder_hidden_states": hidden,
                               "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}).sample

    def drawn(x, seed=0, gen=None):
        noise, t = ctx.schedule.sample(x, gen or torch.Generator().manual_seed(seed))
        return ctx.schedule.add_noise(x, noise, t), noise, t

    def mse(a, b):
        return float(((a - b) ** 2).mean())

    def create(kind, name, **options):
        return get_registry().create(kind, name, options)

    x_t, noise, t = drawn(x0)
    with torch.no_grad():
        pred = eps(params, x_t, t, PROMPTS)
        expected = {
            "ga": -mse(pred, noise),
            "ca": mse(pred, eps(ctx.theta0, x_t, t, anchors)),
            "distill": mse(pred, eps(ctx.theta0, x_t, t, PROMPTS)),
            "denoise": mse(pred, noise),
        }
        one = torch.Generator().manual_seed(0)
        xi, ni, ti = drawn(x0, gen=one)
        xp, np_, tp = drawn(x0_prior, gen=one)
        expected["prior_preservation"] = mse(eps(params, xi, ti, PROMPTS), ni) + mse(eps(params, xp, tp, ["a dog"] * 2), np_)
    losses = {"ga": ("harmful-loss", "ga"), "ca": ("harmful-loss", "ca"), "distill": ("regularizer", "distill"),
              "denoise": ("finetune-loss", "denoise"), "prior_preservation": ("finetune-loss", "prior_preservation")}
    before = fastpath.current()
    try:
        for path in fastpath.PATHS:
            fastpath.use(path)
            for key, (kind, name) in losses.items():
                got = float(create(kind, name)(ctx, params, batch, torch.Generator().manual_seed(0)))
                assert got == pytest.approx(expected[key], rel=1e-4, abs=1e-7), (key, path)
    finally:
        fastpath.use(before)


@pytest.mark.parametrize("command", ["run", "eval", "attack"])
def test_commands_name_the_bad_part_of_an_sdxl_folder_before_any_work(tiny_sdxl_dir, tmp_path, capsys, command):
    from resalign.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(tiny_sdxl_dir, bad)
    shutil.rmtree(bad / "text_encoder_2")
    from resalign.data.folders import write_folder

    write_folder(tmp_path / "benign", np.zeros((2, 16, 16, 3), np.uint8), ["a dog"] * 2)
    args = {"run": ["run", "--model", str(bad), "--out", str(tmp_path / "o")],
            "eval": ["eval", str(bad), "--out", str(tmp_path / "o")],
            "attack": ["attack", str(bad), "--data", str(tmp_path / "benign"), "--out", str(tmp_path / "o")]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks text_encoder_2" in err
    assert not (tmp_path / "o" / "model").exists() and not (tmp_path / "o" / "data").exists()


def test_training_pairs_carry_their_original_size_and_crop_in_the_time_ids(bundle):
    """As diffusers' train_text_to_image_sdxl.py: (original h, w, crop top, left, target h, w), the crop
    of the centre square after resizing the shorter side to the resolution."""
    from resalign.eval.protocol.pairs import Pairs, encode_pairs

    enc = encode_pairs(bundle, Pairs(np.zeros((2, 24, 32, 3), np.uint8), ["a dog", "a cat"]))
    assert enc.x0.shape == (2, 4, 8, 8)
    assert enc.cond.time_ids.tolist() == [[24.0, 32.0, 0.0, 2.0, 16.0, 16.0]] * 2  # 32·16/24 → 21 wide, left 2
    torch.testing.assert_close(enc.cond.pooled, bundle.encode_prompts(["a dog", "a cat"]).pooled)


def test_fp16_variant_folders_load_and_the_vae_stays_fp32(tiny_sdxl_dir, tmp_path):
    """A folder shipped as ``*.fp16.safetensors`` only (as SDXL checkpoints are): read as the variant;
    in fp16 the VAE with ``force_upcast`` stays fp32, as StableDiffusionXLPipeline decodes."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, torch_dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=True)
    assert not list((tmp_path / "fp16" / "unet").glob("diffusion_pytorch_model.safetensors"))
    half = T2IBundle.load(tmp_path / "fp16", dtype="fp16")
    assert half.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    assert half.vae.dtype == torch.float32 and half.vae.config.force_upcast
    full = T2IBundle.load(tmp_path / "fp16")
    ref = T2IBundle.load(tiny_sdxl_dir)
    assert full.dtype == torch.float32
    ours, theirs = full.unet.state_dict(), ref.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k].half().float()) for k in ours)  # the fp16 weights, read as fp32
    images = half.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_lora_targets_the_sdxl_attention_projections(bundle):
    from resalign.registry import get_registry

    lora = get_registry().create("adapter", "lora", {})
    theta = {k: v for k, v in bundle.unet.named_parameters()}
    targets = lora.targets(theta)
    # self- and cross-attention q, k, v, out of every transformer block; nothing of the added embedding
    attn = [k for k in theta if k.endswith(".weight") and any(f".{a}.{p}." in k or k.endswith(f".{a}.{p}.weight")
            for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))]
    assert sorted(targets) == sorted(attn) and len(attn) == 4 * 2 * 4  # 1 down, 1 mid, 2 up transformer blocks
    assert not [k for k in targets if "add_embedding" in k or "time_embedding" in k]
    cross_k = [k for k in targets if "attn2.to_k" in k]
    assert all(theta[k].shape[1] == 16 + 24 for k in cross_k)  # reads both encoders' hidden states


def test_the_sdxl_preset_is_chosen_from_the_folder_and_differs_from_sd_where_it_says(tiny_sdxl_dir, tiny_sd_dir, bundle):
    from resalign.eval.scoring.evaluator import resolve_generation
    from resalign.eval.scoring.presets import preset_name
    from resalign.settings.presets import PRESETS, SDXL_CHANGES
    from resalign.settings.run import preset_of

    assert preset_of(str(tiny_sdxl_dir)) == "sdxl" and preset_of(str(tiny_sd_dir)) == "sd"
    assert preset_name(bundle) == "sdxl"
    sd, xl = PRESETS["sd"].run, PRESETS["sdxl"].run
    differ = {k for k in sd if sd[k] != xl[k]}
    assert differ == set(SDXL_CHANGES)
    for key, value in SDXL_CHANGES.items():
        if isinstance(value, dict):
            assert {k for k in sd[key] if sd[key][k] != xl[key][k]} == set(value)
    # the paper's sampling: 3 images per prompt, 30 steps, CFG 7.5, as for SD 1.x
    gen = resolve_generation("sdxl")
    assert (gen.images_per_prompt, gen.steps, gen.guidance) == (3, 30, 7.5)
