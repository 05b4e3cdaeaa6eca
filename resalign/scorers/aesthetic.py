"""``aesthetic`` scorer: LAION's aesthetic predictor, the third utility column of the paper's Tab. 1.

The predictor (Schuhmann et al. [36]) is a head on the L2-normalised CLIP ViT-L/14 image embedding
(projected: open_clip's ``encode_image``, transformers' ``get_image_features``); the figure is the
mean predicted score over the images (SD v1.4: 6.04 in Tab. 1). Two heads are read:

* the **linear** predictor (``LAION-AI/aesthetic-predictor``'s ``sa_0_4_vit_l_14_linear.pth``, the one
  the ResAlign authors' ``eval_aesthetic.py`` uses): one ``Linear(768, 1)``, state-dict keys
  ``weight`` (1, 768) and ``bias`` (1,);
* the **MLP** predictor (``christophschuhmann/improved-aesthetic-predictor``'s
  ``sac+logos+ava1-l14-linearMSE.pth``): keys ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``,
  ``layers.7`` (``.weight``, ``.bias``), Linear 768→1024→128→64→16→1. Its odd indices 1, 3, 5 are
  Dropout layers (no-ops in evaluation) and it has no activation functions, so it is applied as the
  chain of its Linear layers in index order, as the authors' ``MLP`` module computes it.

The head is a local file: ``.safetensors``, or a torch state dict (``.pth``/``.pt``) read with
``torch.load(weights_only=True)`` — a file that needs more than tensors is refused, never unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from resalign.components import Component, ScoreResult
from resalign.errors import ModelLoadError
from resalign.scorers.clip import LocalClip, check_clip_folder, ViTL14Images
from resalign.scorers.weights import LocalModelConfig, file_sha256, load_state_dict, require_file

_HEAD_EXPECTED = ("LAION's aesthetic head as a state dict (.safetensors, or .pth read with weights_only): "
                  "the linear sa_0_4_vit_l_14_linear.pth (weight, bias) or the MLP "
                  "sac+logos+ava1-l14-linearMSE.pth (layers.0/2/4/6/7.weight and .bias)")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def head_layers(state: dict[str, Any], path: Path, option: str, embed_dim: int) -> list[tuple[Any, Any]]:
    """The (weight, bias) pairs of the head in order, checked to chain from ``embed_dim`` to 1."""
    if set(state) == {"weight", "bias"}:
        layers = [(state["weight"], state["bias"])]
    else:
        found: dict[int, dict[str, Any]] = {}
        for key, value in state.items():
            m = _LAYER_KEY.match(key)
            if m is None:
                raise ModelLoadError(f"{option}: {path} has an unexpected key {key!r}; expected {_HEAD_EXPECTED}")
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
        if not found:
            raise ModelLoadError(f"{option}: {path} holds no layers; expected {_HEAD_EXPECTED}")
        layers = []
        for idx in sorted(found):
            if set(found[idx]) != {"weight", "bias"}:
                raise ModelLoadError(f"{option}: {path}: layers.{idx} lacks its weight or bias; "
                                     f"expected {_HEAD_EXPECTED}")
            layers.append((found[idx]["weight"], found[idx]["bias"]))
    width = embed_dim
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or b.ndim != 1 or w.shape[0] != b.shape[0] or w.shape[1] != width:
            raise ModelLoadError(
                f"{option}: {path.name}: layer {i} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, "
                f"which do not take the {width}-d input there"
                + (" (the CLIP model's image embedding; LAION's heads expect CLIP ViT-L/14, 768)" if i == 0 else "")
                + f"; expected {_HEAD_EXPECTED}")
        width = int(w.shape[0])
    if width != 1:
        raise ModelLoadError(f"{option}: {path.name}: the head ends in {width} outputs, not one score; "
                             f"expected {_HEAD_EXPECTED}")
    return [(w.float(), b.float()) for w, b in layers]


class AestheticScorer(ViTL14Images, Component):
    """LAION aesthetic score: a linear or MLP head on the normalised CLIP ViT-L/14 image embedding."""

    name: ClassVar[str] = "aesthetic"
    metric: ClassVar[str] = "aesthetic_score"

    @dataclass
    class Config(LocalModelConfig):
        """``model``: a local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14)."""

        #: the predictor head's state dict (.safetensors or .pth); required
        head: str = ""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        check_clip_folder(self.config.model, self.option("model"), "CLIP ViT-L/14", text=False)
        self.head_file = require_file(self.config.head, self.option("head"), _HEAD_EXPECTED)
        self._clip: LocalClip | None = None
        self._layers: list[tuple[Any, Any]] | None = None
        self._sha256: str | None = None

    def option(self, key: str) -> str:
        return f"{self.name}.{key}"

    @property
    def layers(self) -> list[tuple[Any, Any]]:
        if self._layers is None:
            state = load_state_dict(self.head_file, self.option("head"), _HEAD_EXPECTED)
            self._layers = head_layers(state, self.head_file, self.option("head"), self.clip.embed_dim)
        return self._layers

    def predictions(self, images: np.ndarray) -> np.ndarray:
        """Each image's predicted aesthetic score, (N,) float64."""
        import torch

        from resalign.scorers.images import check_images

        emb = self.clip.image_embeds(check_images(images), self.config.batch_size)
        x = torch.nn.functional.normalize(emb, dim=-1, eps=1e-12)
        with torch.no_grad():
            for w, b in self.layers:
                x = torch.nn.functional.linear(x, w, b)
        return x.squeeze(1).double().numpy()

    def details(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.head_file)
        widths = [int(self.layers[0][0].shape[1])] + [int(w.shape[0]) for w, _ in self.layers]
        return {
            "clip": self.clip.describe(),
            "head": {"file": self.head_file.name, "sha256": self._sha256,
                     "layers": "Linear " + "→".join(map(str, widths))},
            "rule": "head(L2-normalised CLIP image embedding), mean over images",
        }

    def score(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> ScoreResult:
        """Mean predicted aesthetic score of uint8 RGB images (N, H, W, 3)."""
        per = self.predictions(images)
        rows = [{"index": i, "aesthetic": float(s)} for i, s in enumerate(per)]
        return ScoreResult(metric=self.metric, value=float(per.mean()) if len(per) else float("nan"),
                           per_image=rows, details={**self.details(), "n_images": len(rows)})


SCORERS = (AestheticScorer,)
