"""The toy model: tokenizer from the world's vocabulary, save/load round trip, a tiny pretraining run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from resalign.data import toy as world
from resalign.models import toy


def test_every_world_word_is_one_token_and_unknown_words_still_tokenize():
    tok = toy.build_tokenizer()
    vocab = tok.get_vocab()
    for word in world.VOCABULARY:
        ids = tok(word).input_ids
        assert ids == [vocab[toy.BOS], vocab[word + "</w>"], vocab[toy.EOS]], word
    ids = tok("a zebra", padding="max_length", max_length=toy.MAX_TOKENS).input_ids
    assert len(ids) == toy.MAX_TOKENS
    assert tok.convert_ids_to_tokens(ids[2:7]) == ["z", "e", "b", "r", "a</w>"]
    longest = "a small shiny purple triangle on white at bottom"
    assert len(tok(longest).input_ids) <= toy.MAX_TOKENS


def test_unet_is_small_and_attends_only_at_the_lowest_resolution():
    unet = toy.build_unet(seed=0)
    assert sum(p.numel() for p in unet.parameters()) < 1_000_000
    cfg = unet.config
    assert cfg.down_block_types[0] == "DownBlock2D" and cfg.up_block_types[-1] == "UpBlock2D"
    # attention modules exist only in the 8x8 blocks
    attn = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert attn and all(n.startswith(("down_blocks.1", "up_blocks.0", "mid_block")) for n in attn)


def test_save_load_round_trip_through_the_bundle_loader(tmp_path):
    from resalign.models.bundle import T2IBundle
    from resalign.models.loaders import ToyModel

    bundle = toy.build_bundle(seed=3)
    bundle.save(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "ResAlignToyPipeline"
    loaded = T2IBundle.load(tmp_path / "model")
    assert loaded.vae is None and loaded.image_size == 16 and loaded.latent_shape == (3, 16, 16)
    for (k, a), (_, b) in zip(bundle.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert torch.equal(a, b), k
    prompts = ["a small shiny red ring on grey at left", "a blue square"]
    assert torch.allclose(bundle.encode_prompts(prompts), loaded.encode_prompts(prompts), atol=1e-6)
    assert loaded.tokenizer(prompts[0]).input_ids == bundle.tokenizer(prompts[0]).input_ids
    assert loaded.scheduler.config.steps_offset == 1
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    # the registered loader reads the same folder
    loader = ToyModel()
    assert loader.can_load(str(tmp_path / "model"))
    assert loader.load(str(tmp_path / "model")).kind == "toy"


def test_shipped_model_loads_through_the_registry_when_present():
    from resalign.registry import build_registry

    try:
        path = toy.toy_model_dir()
    except Exception:
        pytest.skip("the toy assets are not installed in this tree")
    reg = build_registry(entry_points=False)
    bundle = reg.create("model", "toy").load(None)
    assert bundle.kind == "toy" and bundle.source == str(path)


def test_shipped_model_draws_what_it_is_asked_for():
    """A small-sample smoke check of the shipped model with the shipped classifiers (docs hold the full figures)."""
    from resalign.eval.scoring.generate import generate
    from resalign.scorers.toy import ToyHarmScorer, ToyPromptAccuracyScorer

    try:
        bundle = toy.load_toy()
        harm = ToyHarmScorer()
        acc = ToyPromptAccuracyScorer()
    except Exception:
        pytest.skip("the toy assets are not installed in this tree")
    harmful = world.harmful_prompts(24, seed=0)
    benign = world.preservation_prompts(24, seed=0)
    images = generate(bundle, harmful + benign, steps=10, guidance=toy.GUIDANCE, seed=0, batch_size=48)
    assert harm.score(images[:24]).value > 0.6
    assert harm.score(images[24:]).value < 0.3
    assert acc.score(images[24:], benign).value > 0.6


def test_missing_assets_error_names_the_folder(monkeypatch, tmp_path):
    from resalign.errors import ModelLoadError

    monkeypatch.setattr(toy, "toy_assets_dir", lambda: tmp_path)
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        toy.toy_model_dir()


def test_tiny_pretraining_writes_the_shipped_layout_and_is_reproducible(tmp_path):
    from resalign.models.toy_training import PretrainConfig, train_base_model

    cfg = PretrainConfig(steps=3, batch_size=4, pool=64, check_every=0, channels=(8, 16))
    a = train_base_model(cfg)
    b = train_base_model(cfg)
    for (k, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), k
    a.save(tmp_path / "model")
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "model" / sub).is_dir()
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "model" / "unet").iterdir())
    loaded = toy.load_toy(tmp_path / "model")
    from resalign.eval.scoring.generate import generate

    img_a = generate(a, ["a red circle"], images_per_prompt=2, steps=2)
    img_b = generate(loaded, ["a red circle"], images_per_prompt=2, steps=2)
    assert np.array_equal(img_a, img_b)
