"""Image-caption pairs for downstream fine-tuning: checks, mixing (Fig. 4) and their model-space form."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from resalign.components import Cond, DenoiseBatch
from resalign.errors import ConfigError, DataError


class PairData(Protocol):
    """Image-caption pairs: ``images`` uint8 (N, H, W, 3) RGB and ``prompts`` (N captions)."""

    images: np.ndarray
    prompts: list[str]


@dataclass
class Pairs:
    """A plain image-caption set (what :class:`PairData` describes)."""

    images: np.ndarray
    prompts: list[str]
    name: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def check_pairs(data: PairData, where: str) -> None:
    """Fail early, naming ``where``, when a data set is empty or its images and captions disagree."""
    images = getattr(data, "images", None)
    prompts = getattr(data, "prompts", None)
    if images is None or prompts is None:
        raise DataError(f"{where}: expected image-caption pairs with .images and .prompts")
    images = np.asarray(images)
    if len(prompts) == 0:
        raise DataError(f"{where}: no image-caption pairs")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (N, H, W, 3) RGB, got {images.dtype} {images.shape}")
    if images.shape[0] != len(prompts):
        raise DataError(f"{where}: {images.shape[0]} images but {len(prompts)} captions")


def _resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bilinear) and centre-crop, as the diffusers scripts do."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    out = np.empty((images.shape[0], size, size, 3), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img)
        w, h = pil.size
        scale = size / min(w, h)
        pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(pil.crop((left, top, left + size, top + size)).convert("RGB"))
    return out


@dataclass
class Encoded:
    """A pair set in model space: x_0 (N, C, h, w) and the captions' conditioning c (N, L, D; with
    SDXL's pooled embeddings and time ids), float32."""

    x0: torch.Tensor
    cond: Cond
    name: str = ""


def encode_pairs(bundle: Any, data: PairData, *, prompts: Sequence[str] | None = None, batch: int = 16) -> Encoded:
    """Images to model space x_0 (VAE latents or pixels) and captions to text embeddings c, once."""
    original = np.asarray(data.images)
    images = _resize_square(original, bundle.image_size)
    caps = list(prompts) if prompts is not None else list(data.prompts)
    xs, generator = [], torch.Generator(device=bundle.device).manual_seed(0)  # the VAE posterior's sample
    for i in range(0, len(images), batch):
        t = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        xs.append(bundle.encode_images(t, generator).float())
    # SDXL's time ids: the size before resizing and the centre crop's corner, as train_text_to_image_sdxl.py
    h, w = int(original.shape[1]), int(original.shape[2])
    scale = bundle.image_size / min(h, w)
    top = (max(bundle.image_size, round(h * scale)) - bundle.image_size) // 2
    left = (max(bundle.image_size, round(w * scale)) - bundle.image_size) // 2
    cond = bundle.encode_prompts(caps, original_size=(h, w), crop_top_left=(top, left)).float()
    return Encoded(torch.cat(xs), cond, getattr(data, "name", ""))


class Batches:
    """Epoch-shuffled mini-batches of one encoded set (seeded), as a DataLoader with shuffle=True."""

    def __init__(self, enc: Encoded, batch_size: int, rng: np.random.Generator):
        self.enc, self.batch_size, self.rng = enc, batch_size, rng
        self.order: list[int] = []

    def next(self) -> DenoiseBatch:
        idx = []
        while len(idx) < self.batch_size:
            if not self.order:
                self.order = list(self.rng.permutation(self.enc.x0.shape[0]))
            idx.append(self.order.pop())
        return DenoiseBatch(x0=self.enc.x0[idx], cond=self.enc.cond[idx])



def contaminate(
    benign: PairData, harmful: PairData, ratio: float, *, seed: int = 0, name: str = ""
) -> Pairs:
    """Replace a ``ratio`` share of ``benign``'s pairs with random ``harmful`` pairs (Fig. 4, App. B.2).

    The set keeps its size; ratio 0 is the clean set and 1 is all harmful.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"--contaminate {ratio}: expected a ratio between 0 and 1")
    check_pairs(benign, "fine-tuning data")
    check_pairs(harmful, "--harmful-data")
    n = len(benign.prompts)
    k = round(ratio * n)
    rng = np.random.default_rng(seed)
    clean, dirty = _resize_like(np.asarray(benign.images), np.asarray(harmful.images))
    replace = rng.choice(n, size=k, replace=False) if k else np.array([], int)
    source = rng.choice(len(harmful.prompts), size=k, replace=k > len(harmful.prompts))
    out_images = clean.copy()
    prompts = list(benign.prompts)
    for i, j in zip(replace, source):
        out_images[i] = dirty[j]
        prompts[i] = harmful.prompts[j]
    return Pairs(out_images, prompts, name or f"{getattr(benign, 'name', '') or 'data'}+{ratio:g}harmful")


def _resize_like(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring two image sets to one square size (the smaller of the two) so they can be mixed."""
    size = min(a.shape[1], a.shape[2], b.shape[1], b.shape[2])
    return _resize_square(a, size), _resize_square(b, size)
