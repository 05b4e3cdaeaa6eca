"""``clip-score`` scorer, and the local CLIP model that it and the unsafe scorers share.

CLIP score (Sec. 4.1, App. B.3, [61]) is the text–image alignment of a generated image and its
prompt: the cosine similarity of their CLIP embeddings, averaged over images and reported ×100
(``scale``), which is the CLIP logit of a trained CLIP (its ``logit_scale`` is 100). The paper's
figures (about 31 for SD v1.4 on COCO, Tab. 1) use ViT-B/32. ``clamp`` turns negative cosines into
0, as torchmetrics' ``CLIPScore`` does.

The model is a local transformers CLIP folder (``CLIPModel.save_pretrained``: ``config.json``,
``model.safetensors``, the tokenizer and ``preprocessor_config.json``), loaded with
``local_files_only``; nothing is downloaded. Images are preprocessed by the folder's
``CLIPImageProcessor``, prompts tokenized by its tokenizer and truncated to the text model's length.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from resalign.components import Component, ScoreResult
from resalign.errors import DataError, ModelLoadError
from resalign.scorers.weights import auto_device, folder_checksums, require_folder

#: What a CLIP folder must hold: description -> alternative file names.
CLIP_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "vision": {
        "config": ("config.json",),
        "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
        "image processor": ("preprocessor_config.json",),
    },
    "text": {"tokenizer": ("tokenizer.json", "vocab.json")},
}


def _expected(what: str) -> str:
    return (f"a local transformers CLIP folder ({what}; CLIPModel.save_pretrained with its tokenizer and "
            "CLIPImageProcessor: config.json, model.safetensors, tokenizer files, preprocessor_config.json)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_clip_folder(path: str | os.PathLike, option: str, what: str, *, text: bool) -> Path:
    """``path`` as a CLIP folder with the files needed (the text side only when ``text``)."""
    files = dict(CLIP_FILES["vision"])
    if text:
        files.update(CLIP_FILES["text"])
    return require_folder(path, option, _expected(what), files)


class LocalClip:
    """A transformers CLIP model from a local folder: projected image and text embeddings."""

    def __init__(self, folder: str | os.PathLike, *, option: str, what: str, text: bool = True,
                 device: str = "") -> None:
        import torch

        self.folder = check_clip_folder(folder, option, what, text=text)
        self.device = torch.device(auto_device(device))
        try:
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

            model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True)
            self.model = model.float().eval().to(self.device)
            self.processor = CLIPImageProcessor.from_pretrained(str(self.folder), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True) if text else None
        except Exception as exc:  # transformers, tokenizers and safetensors raise their own types
            raise ModelLoadError(f"{option}: cannot load {self.folder} as CLIP ({_first_line(exc)}); "
                                 f"expected {_expected(what)}") from exc
        self._sha256: dict[str, str] | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _batched(self, n: int, batch_size: int, project: Any):
        """``project(slice)`` over the batches of ``n`` items without gradients, stacked (N, D) float32 on the CPU."""
        import torch

        out = []
        for start in range(0, n, batch_size):
            with torch.no_grad():
                out.append(project(slice(start, start + batch_size)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def image_embeds(self, images: np.ndarray, batch_size: int = 32):
        """Projected, unnormalised image embeddings (N, D), float32 on the CPU (open_clip's
        ``encode_image``, transformers' ``get_image_features``)."""
        from PIL import Image

        def project(batch: slice):
            pil = [Image.fromarray(im) for im in images[batch]]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

        return self._batched(len(images), batch_size, project)

    def text_embeds(self, prompts: Sequence[str], batch_size: int = 32):
        """Projected, unnormalised text embeddings (N, D), float32 on the CPU; prompts truncated to
        the text model's context length."""
        limit = int(self.model.config.text_config.max_position_embeddings)

        def project(batch: slice):
            tok = self.tokenizer(list(prompts[batch]), padding=True, truncation=True, max_length=limit,
                                 return_tensors="pt")
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            return self.model.text_projection(pooled)

        return self._batched(len(prompts), batch_size, project)

    def checksums(self) -> dict[str, str]:
        """SHA-256 of the folder's weight files (computed once)."""
        if self._sha256 is None:
            self._sha256 = folder_checksums(self.folder)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        vis = cfg.vision_config
        return {
            "model": str(self.folder),
            "architecture": f"CLIP vision {vis.num_hidden_layers}x{vis.hidden_size} patch {vis.patch_size} "
                            f"@{vis.image_size}, embedding {cfg.projection_dim}",
            "weights_sha256": self.checksums(),
            "device": str(self.device),
        }


def check_prompts(prompts: Sequence[str] | None, n: int, scorer: str) -> list[str]:
    if prompts is None:
        raise DataError(f"{scorer} scores images against their prompts: give one prompt per image "
                        "(for a folder, captions in its metadata.jsonl)")
    prompts = list(prompts)
    if len(prompts) != n:
        raise DataError(f"{scorer}: {len(prompts)} prompts for {n} images")
    return prompts


class ClipScoreScorer(Component):
    """CLIP score: ``scale`` × cos(CLIP image embedding, CLIP text embedding), averaged over images."""

    name: ClassVar[str] = "clip-score"
    metric: ClassVar[str] = "clip_score"
    #: the CLIP model the figure is usually reported with (for error messages)
    clip_what: ClassVar[str] = "ViT-B/32 in the paper"

    @dataclass
    class Config:
        #: a local transformers CLIP folder (the paper: ViT-B/32); required
        model: str = ""
        #: the reported figure is scale × cosine (100: CLIP's logit scale, the field's convention)
        scale: float = 100.0
        #: negative cosines count as 0 (torchmetrics' CLIPScore)
        clamp: bool = False
        batch_size: int = 32
        #: torch device; empty = CUDA when available, else the CPU
        device: str = ""

        def __post_init__(self) -> None:
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
            if self.scale <= 0:
                raise ValueError(f"scale must be positive, got {self.scale}")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        check_clip_folder(self.config.model, f"{self.name}.model", self.clip_what, text=True)
        self._clip: LocalClip | None = None

    @property
    def clip(self) -> LocalClip:
        if self._clip is None:
            self._clip = LocalClip(self.config.model, option=f"{self.name}.model", what=self.clip_what,
                                   text=True, device=self.config.device)
        return self._clip

    def cosines(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image and its prompt, (N,) float64."""
        import torch

        from resalign.scorers.images import check_images

        images = check_images(images)
        prompts = check_prompts(prompts, len(images), self.name)
        img = self.clip.image_embeds(images, self.config.batch_size).double()
        txt = self.clip.text_embeds(prompts, self.config.batch_size).double()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1, eps=1e-12)
        return cos.numpy()

    def details(self) -> dict[str, Any]:
        """The model (folder, architecture, weights' SHA-256), scale and rule."""
        return {
            **self.clip.describe(),
            "scale": self.config.scale,
            "clamp": self.config.clamp,
            "rule": f"{self.config.scale:g} x cos(image embedding, prompt embedding)"
                    + (", negatives as 0" if self.config.clamp else "") + ", mean over images",
        }

    def score(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> ScoreResult:
        """Mean CLIP score of the images against their prompts."""
        cos = self.cosines(images, prompts)
        per = self.config.scale * (np.maximum(cos, 0.0) if self.config.clamp else cos)
        rows = [{"index": i, self.metric: float(s), "cosine": float(c)} for i, (s, c) in enumerate(zip(per, cos))]
        return ScoreResult(
            metric=self.metric,
            value=float(per.mean()) if len(per) else float("nan"),
            per_image=rows,
            details={**self.details(), "n_images": len(rows)},
        )


SCORERS = (ClipScoreScorer,)


class ViTL14Images:
    """Mixin of the scorers whose ``config.model`` is a local CLIP ViT-L/14 folder read for its image
    embeddings (the input of LAION's heads: aesthetic, unsafe); ``clip`` loads it on first use."""

    _clip: LocalClip | None = None

    @property
    def clip(self) -> LocalClip:
        if self._clip is None:
            self._clip = LocalClip(self.config.model, option=self.option("model"), what="CLIP ViT-L/14",
                                   text=False, device=self.config.device)
        return self._clip
