"""Personalization scorers of the paper's Tab. 2–4: ``clip-i``, ``clip-t`` and ``dino``.

After a personalization fine-tuning (DreamBooth, LoRA, CustomDiffusion, SVDiff on a small reference
set), the paper measures, as DreamBooth [68] does:

* **CLIP-I** (``clip-i``): the mean cosine similarity between the CLIP image embeddings (projected,
  transformers' ``get_image_features``) of the generated images and those of the reference images —
  every generated image against every reference image, averaged;
* **CLIP-T** (``clip-t``): the mean cosine similarity between each generated image's CLIP embedding and
  its prompt's. That is ``clip-score``'s computation; ``clip-t`` is the same class under its
  personalization name, reported as the raw cosine (scale 1, DreamBooth's and the paper's Tab. 2
  convention, e.g. 0.27) instead of ×100;
* **DINO** (``dino``): the same pairwise mean as CLIP-I on the [CLS] features of a self-supervised
  DINO ViT (``last_hidden_state[:, 0]``, after the final layer norm; DreamBooth uses ViT-S/16).

Models are local transformers folders read with ``local_files_only``; the reference set is a folder
of images (any sizes: each network's image processor resizes them), read with
:func:`resalign.data.folders.load_image`. Their features are computed once per scorer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from resalign.components import Component, ScoreResult
from resalign.errors import ConfigError, DataError, ModelLoadError
from resalign.scorers.clip import ClipScoreScorer, LocalClip, check_clip_folder
from resalign.scorers.weights import LocalModelConfig, auto_device, folder_checksums, require_folder

#: Image files a reference folder may hold (searched recursively).
REFERENCE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: transformers model types read as DINO ViTs.
DINO_MODEL_TYPES: tuple[str, ...] = ("vit", "dinov2", "dinov2_with_registers")

_DINO_EXPECTED = ("a local transformers DINO ViT folder (ViTModel or Dinov2Model.save_pretrained with its image "
                  "processor: config.json, model.safetensors, preprocessor_config.json; DreamBooth: "
                  "facebook/dino-vits16)")
_DINO_FILES: dict[str, tuple[str, ...]] = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    "image processor": ("preprocessor_config.json",),
}


def reference_files(folder: str | os.PathLike, option: str) -> list[Path]:
    """The image files of a reference folder (recursively, sorted), or a one-line error naming ``option``."""
    if not str(folder):
        raise ConfigError(f"{option} is not set: give the folder of reference (personalization) images")
    root = Path(folder).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "not found"
        raise DataError(f"{option}: {root} {what}; expected a folder of reference images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES)
    if not files:
        raise DataError(f"{option}: {root} holds no images ({', '.join(REFERENCE_SUFFIXES)})")
    return files


def mean_pairwise_cosine(generated, reference):
    """(N,) float64: each generated feature's mean cosine similarity to every reference feature."""
    import torch

    gen = torch.nn.functional.normalize(generated.double(), dim=-1, eps=1e-12)
    ref = torch.nn.functional.normalize(reference.double(), dim=-1, eps=1e-12)
    return (gen @ ref.T).mean(dim=1).numpy()


class _ReferenceSimilarity(Component):
    """Mean cosine similarity of the scored images' features to a reference set's (subclasses give
    the features)."""

    metric: ClassVar[str]
    rule: ClassVar[str]
    #: ``reference`` is the personalization training set: ``attack`` fills it with its ``--data`` folder
    personalization_reference: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.check_model()
        self.reference = reference_files(self.config.reference, self.option("reference"))
        self._reference_features = None

    def option(self, key: str) -> str:
        return f"{self.name}.{key}"

    def check_model(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, images):  # pragma: no cover - abstract
        """(N, D) float32 features of uint8 RGB images (an array or a list of arrays of any sizes)."""
        raise NotImplementedError

    def describe_model(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def reference_features(self):
        if self._reference_features is None:
            from resalign.data.folders import load_image

            try:
                arrays = [load_image(p) for p in self.reference]
            except DataError as exc:
                raise DataError(f"{self.option('reference')}: {exc}") from exc
            self._reference_features = self.features(arrays)
        return self._reference_features

    def similarities(self, images: np.ndarray) -> np.ndarray:
        """Each image's mean cosine similarity to the reference images, (N,) float64."""
        from resalign.scorers.images import check_images

        return mean_pairwise_cosine(self.features(check_images(images)), self.reference_features)

    def details(self) -> dict[str, Any]:
        """The model (folder, architecture, weights' SHA-256), the reference set and the rule."""
        return {
            **self.describe_model(),
            "reference": str(Path(self.config.reference).expanduser()),
            "reference_count": len(self.reference),
            "rule": self.rule,
        }

    def score(self, images: np.ndarray, prompts: Any = None) -> ScoreResult:
        """Mean over images of each image's mean cosine similarity to every reference image."""
        per = self.similarities(images)
        rows = [{"index": i, self.metric: float(s)} for i, s in enumerate(per)]
        return ScoreResult(metric=self.metric, value=float(per.mean()) if len(per) else float("nan"),
                           per_image=rows, details={**self.details(), "n_images": len(rows)})


@dataclass
class _ReferenceConfig(LocalModelConfig):
    #: the folder of reference (personalization training) images; required
    reference: str = ""


class ClipIScorer(_ReferenceSimilarity):
    """CLIP-I: mean cos(CLIP image embedding of a generated image, of a reference image), all pairs."""

    name: ClassVar[str] = "clip-i"
    metric: ClassVar[str] = "clip_i"
    rule: ClassVar[str] = ("cos(CLIP image embedding, reference image embedding), mean over every "
                           "(generated, reference) pair (DreamBooth's CLIP-I)")
    _what: ClassVar[str] = "ViT-B/32 for DreamBooth's CLIP-I"

    @dataclass
    class Config(_ReferenceConfig):
        pass

    def check_model(self) -> None:
        check_clip_folder(self.config.model, self.option("model"), self._what, text=False)
        self._clip: LocalClip | None = None

    @property
    def clip(self) -> LocalClip:
        if self._clip is None:
            self._clip = LocalClip(self.config.model, option=self.option("model"), what=self._what, text=False,
                                   device=self.config.device)
        return self._clip

    def features(self, images):
        return self.clip.image_embeds(images, self.config.batch_size)

    def describe_model(self) -> dict[str, Any]:
        return self.clip.describe()


class ClipTScorer(ClipScoreScorer):
    """CLIP-T: ``clip-score``'s image–prompt cosine under its personalization name, as the raw cosine."""

    name: ClassVar[str] = "clip-t"
    metric: ClassVar[str] = "clip_t"
    clip_what: ClassVar[str] = "ViT-B/32 for DreamBooth's CLIP-T"

    @dataclass
    class Config(ClipScoreScorer.Config):
        #: the reported figure is scale × cosine (1: the raw cosine of DreamBooth and the paper's Tab. 2)
        scale: float = 1.0


def _quietly(load, *args, **kwargs):
    """``load(*args, **kwargs)`` with transformers' loading report off: the [CLS] feature does not use
    ViT's pooler, whose weights a DINO checkpoint may hold (reported as unexpected keys)."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    finally:
        logging.set_verbosity(before)


class LocalDino:
    """A DINO ViT (transformers ``ViTModel`` / ``Dinov2Model``) from a local folder: [CLS] features."""

    def __init__(self, folder: str | os.PathLike, *, option: str, device: str = "") -> None:
        import torch

        self.folder = require_folder(folder, option, _DINO_EXPECTED, _DINO_FILES)
        self.device = torch.device(auto_device(device))
        try:
            from transformers import AutoConfig, AutoImageProcessor, AutoModel

            config = AutoConfig.from_pretrained(str(self.folder), local_files_only=True)
            model_type = getattr(config, "model_type", "")
            if model_type not in DINO_MODEL_TYPES:
                raise ModelLoadError(f"{option}: {self.folder} holds a {model_type or 'unknown'} model, not a DINO "
                                     f"ViT ({', '.join(DINO_MODEL_TYPES)}); expected {_DINO_EXPECTED}")
            extra = {"add_pooling_layer": False} if model_type == "vit" else {}
            model = _quietly(AutoModel.from_pretrained, str(self.folder), local_files_only=True, **extra)
            self.model = model.float().eval().to(self.device)
            self.processor = AutoImageProcessor.from_pretrained(str(self.folder), local_files_only=True)
        except ModelLoadError:
            raise
        except Exception as exc:  # transformers and safetensors raise their own types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"{option}: cannot load {self.folder} as a DINO ViT ({first}); "
                                 f"expected {_DINO_EXPECTED}") from exc
        self._sha256: dict[str, str] | None = None

    def cls_features(self, images, batch_size: int = 32):
        """[CLS] token of the last hidden state (after the final layer norm), (N, D) float32 on the CPU."""
        import torch
        from PIL import Image

        out = []
        for start in range(0, len(images), batch_size):
            pil = [Image.fromarray(im) for im in images[start : start + batch_size]]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.no_grad():
                out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, int(self.model.config.hidden_size))

    def describe(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = folder_checksums(self.folder)
        cfg = self.model.config
        return {
            "model": str(self.folder),
            "architecture": f"{cfg.model_type} {cfg.num_hidden_layers}x{cfg.hidden_size} patch {cfg.patch_size} "
                            f"@{cfg.image_size}, [CLS] feature {cfg.hidden_size}",
            "weights_sha256": self._sha256,
            "device": str(self.device),
        }


class DinoScorer(_ReferenceSimilarity):
    """DINO score: mean cos(DINO [CLS] feature of a generated image, of a reference image), all pairs."""

    name: ClassVar[str] = "dino"
    metric: ClassVar[str] = "dino"
    rule: ClassVar[str] = ("cos(DINO ViT [CLS] feature, reference image's), mean over every "
                           "(generated, reference) pair (DreamBooth's DINO)")

    @dataclass
    class Config(_ReferenceConfig):
        pass

    def check_model(self) -> None:
        require_folder(self.config.model, self.option("model"), _DINO_EXPECTED, _DINO_FILES)
        self._dino: LocalDino | None = None

    @property
    def dino(self) -> LocalDino:
        if self._dino is None:
            self._dino = LocalDino(self.config.model, option=self.option("model"), device=self.config.device)
        return self._dino

    def features(self, images):
        return self.dino.cls_features(images, self.config.batch_size)

    def describe_model(self) -> dict[str, Any]:
        return self.dino.describe()


SCORERS = (ClipIScorer, ClipTScorer, DinoScorer)
