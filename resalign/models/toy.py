"""The toy world's tiny text-to-image model: diffusers and transformers classes at toy sizes.

* UNet: :class:`diffusers.UNet2DConditionModel` in pixel space (16x16 RGB, no VAE), channels (32, 64),
  attention only at the lowest resolution (8x8) so that second-order autograd (Hessian-vector
  products) stays cheap;
* text encoder: :class:`transformers.CLIPTextModel` from a tiny :class:`CLIPTextConfig`;
* tokenizer: a :class:`transformers.CLIPTokenizer` whose BPE vocabulary is built from the world's own
  words (every word is one token; unknown words fall back to single characters);
* schedulers: DDPM (squaredcos_cap_v2, 1000 steps, epsilon) for training, DDIM (``steps_offset=1``)
  for sampling with classifier-free guidance.

The shipped model lives in ``resalign/assets/toy/model`` (diffusers layout, safetensors) and is the
output of ``resalign toy pretrain``; :func:`toy_model_dir` finds it through importlib.resources.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from resalign.data.toy import IMAGE_SIZE, VOCABULARY
from resalign.errors import ModelLoadError

#: Sampling settings the toy model is measured with. Pixel-space guidance oversaturates quickly: at
#: guidance 3-4 the model turns filled shapes hollow and shifts colours, at 2 it follows prompts best.
GUIDANCE = 2.0
SAMPLE_STEPS = 20

#: Text positions (BOS + up to 13 words + EOS/padding); captions of the grammar have at most 11 words.
MAX_TOKENS = 16
TEXT_HIDDEN = 32

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def toy_assets_dir() -> Path:
    """The folder holding the shipped toy assets (model, classifiers, world description)."""
    return Path(str(resources.files("resalign").joinpath("assets", "toy")))


def toy_model_dir() -> Path:
    """The shipped toy model folder (diffusers layout); raises :class:`ModelLoadError` when absent."""
    path = toy_assets_dir() / "model"
    if not (path / "unet").is_dir():
        raise ModelLoadError(
            f"the toy model is not installed at {str(path)!r}: run `resalign toy pretrain --out DIR` "
            "and copy DIR/model there, or pass --model"
        )
    return path


def classifier_path(name: str) -> Path:
    """Path of a shipped ONNX classifier (``harm`` or ``shape_colour``)."""
    path = toy_assets_dir() / f"{name}_classifier.onnx"
    if not path.is_file():
        raise ModelLoadError(f"the toy {name} classifier is not installed at {str(path)!r}")
    return path


# --------------------------------------------------------------------------- tokenizer


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in which every world word is a single token.

    Single letters (with and without the end-of-word mark) are in the vocabulary, so words outside
    the world still tokenize (letter by letter). Merges are added until BPE, as CLIP applies it,
    turns every world word into one token.
    """
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens: list[str] = list(chars) + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(64):
        done = True
        for word in words:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            while len(pieces) > 1:
                done = False
                pair = (pieces[0], pieces[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    if pair[0] + pair[1] not in tokens:
                        tokens.append(pair[0] + pair[1])
                pieces = _bpe(pieces, ranks)
        if done:
            break
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def build_tokenizer(words: tuple[str, ...] = VOCABULARY):
    """A :class:`CLIPTokenizer` over ``words`` with ``model_max_length`` = :data:`MAX_TOKENS`."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges(words)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)
    return tok


# --------------------------------------------------------------------------- model pieces


def build_text_encoder(tokenizer, hidden: int = TEXT_HIDDEN, seed: int | None = None):
    """A randomly initialised tiny :class:`CLIPTextModel` matching ``tokenizer``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    if seed is not None:
        torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(cfg)


def unet_config(cross_attention_dim: int = TEXT_HIDDEN, channels: tuple[int, int] = (32, 64)) -> dict:
    """The tiny UNet's configuration: attention only in the 8x8 block and the 8x8 middle block."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_unet(seed: int | None = None, **overrides):
    """A randomly initialised tiny :class:`UNet2DConditionModel` (pixel space, 16x16 RGB)."""
    import torch
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = unet_config()
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg)


def build_schedulers():
    """(DDPM training scheduler, DDIM sampling scheduler) sharing one cosine noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                  clip_sample=True, clip_sample_range=1.0)
    ddpm = DDPMScheduler(**common)
    ddim = DDIMScheduler(**common, steps_offset=1, set_alpha_to_one=False)
    return ddpm, ddim


def build_bundle(seed: int = 0, channels: tuple[int, int] = (32, 64)):
    """A freshly initialised toy :class:`~resalign.models.bundle.T2IBundle` (untrained)."""
    from resalign.models.bundle import T2IBundle

    tok = build_tokenizer()
    text = build_text_encoder(tok, seed=seed)
    unet = build_unet(seed=seed + 1, block_out_channels=channels)
    _, ddim = build_schedulers()
    return T2IBundle(unet, text, tok, ddim, vae=None, source="toy (untrained)", kind="toy")


def load_toy(path: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "fp32"):
    """Load the shipped toy model (or a toy model folder at ``path``) through :meth:`T2IBundle.load`."""
    from resalign.models.bundle import T2IBundle

    return T2IBundle.load(path if path is not None else toy_model_dir(), device=device, dtype=dtype, kind="toy")
