"""The toy world's classifiers: small CNNs trained on procedural images, exported to ONNX.

* the **harm classifier** (binary: is the harmful shape, the ring, in the image?) — ONNX output
  ``harm_probability`` (N,);
* the **shape/colour classifier** — ONNX outputs ``logits`` (N, |shapes| + |colours|: shape logits
  first) and ``features`` (N, 64), its penultimate activations, which the toy Fréchet distance uses.

Both take ``images`` as float32 (N, 3, 16, 16) in [0, 1]; :class:`OnnxToyClassifier` feeds them from
uint8 RGB (N, H, W, 3) arrays and runs them with onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resalign.data.toy import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    HARMFUL_SHAPE,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    random_scene,
    render,
)
from resalign.errors import ModelLoadError

FEATURE_DIM = 64


def _torch():
    import torch

    return torch


def build_cnn(n_out: int, width: int = 16, feature_dim: int = FEATURE_DIM):
    """A small CNN: four 3x3 convolutions (16 -> 8 -> 4 px), a feature layer on the 4x4 map, a head."""
    torch = _torch()
    nn = torch.nn

    class ToyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
                nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            )
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU())
            self.head = nn.Linear(feature_dim, n_out)

        def forward(self, x):
            f = self.features(self.body(x))
            return self.head(f), f

    return ToyCNN()


# --------------------------------------------------------------------------- training data


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Perturb uint8 images the way generated ones differ from clean drawings: blur, noise, tint."""
    x = images.astype(np.float32)
    n = len(x)
    # Blend with a 3x3 box blur by a random amount.
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blur = sum(pad[:, i : i + IMAGE_SIZE, j : j + IMAGE_SIZE] for i in range(3) for j in range(3)) / 9.0
    a = rng.uniform(0, 0.6, (n, 1, 1, 1)) * (rng.random((n, 1, 1, 1)) < 0.5)
    x = (1 - a) * x + a * blur
    x = x + rng.normal(0, 1, (n, 1, 1, 1)) * 6 + rng.normal(0, 1, (n, 1, 1, 3)) * 6
    x = x + rng.normal(0, 1, x.shape) * rng.uniform(0, 12, (n, 1, 1, 1))
    return np.clip(x, 0, 255).astype(np.uint8)


def labelled_images(n: int, seed: int, harm_share: float | None = None) -> tuple[np.ndarray, list[Scene]]:
    """``n`` procedural images with their scenes; ``harm_share`` of them rings (else uniform shapes)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        if harm_share is None:
            scenes.append(random_scene(rng))
        elif rng.random() < harm_share:
            scenes.append(random_scene(rng, shapes=[HARMFUL_SHAPE]))
        else:
            scenes.append(random_scene(rng, shapes=[s for s in SHAPES if s != HARMFUL_SHAPE]))
    images = np.stack([render(s, rng) for s in scenes])
    return images, scenes


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1] (the classifiers' input)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images of shape (N, H, W, 3), got {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- training


@dataclass
class ClassifierTraining:
    """Settings of a classifier's training run."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    pool: int = 12000  # procedural training images (augmented afresh at every step)
    seed: int = 0


def _targets(scenes: list[Scene], kind: str) -> np.ndarray:
    if kind == "harm":
        return np.array([s.shape == HARMFUL_SHAPE for s in scenes], np.float32)
    return np.array([[SHAPES.index(s.shape), COLOUR_NAMES.index(s.colour)] for s in scenes], np.int64)


def _loss(model_out, y, kind: str):
    torch = _torch()
    logits, _ = model_out
    if kind == "harm":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y)
    ns = len(SHAPES)
    return torch.nn.functional.cross_entropy(logits[:, :ns], y[:, 0]) + torch.nn.functional.cross_entropy(
        logits[:, ns:], y[:, 1]
    )


def train_classifier(
    kind: str, cfg: ClassifierTraining = ClassifierTraining(), progress: Callable[[int, int, float], None] | None = None
):
    """Train the ``harm`` or ``shape_colour`` classifier from scratch; returns the torch module (eval mode)."""
    torch = _torch()
    if kind not in ("harm", "shape_colour"):
        raise ValueError(f"unknown classifier {kind!r}: expected 'harm' or 'shape_colour'")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    images, scenes = labelled_images(cfg.pool, cfg.seed, harm_share=0.5 if kind == "harm" else None)
    targets = _targets(scenes, kind)
    model = build_cnn(1 if kind == "harm" else len(SHAPES) + len(COLOUR_NAMES))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    model.train()
    for step in range(cfg.steps):
        idx = rng.integers(0, len(images), cfg.batch_size)
        x = torch.from_numpy(to_input(augment(images[idx], rng)))
        y = torch.from_numpy(targets[idx])
        loss = _loss(model(x), y, kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, cfg.steps, loss.item())
    model.eval()
    return model


def predict_torch(model, images: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """The classifier's outputs (as the ONNX export names them) computed with torch."""
    torch = _torch()
    with torch.no_grad():
        logits, feats = model(torch.from_numpy(to_input(images)))
    if kind == "harm":
        return {"harm_probability": torch.sigmoid(logits[:, 0]).numpy()}
    return {"logits": logits.numpy(), "features": feats.numpy()}


# --------------------------------------------------------------------------- ONNX export and inference


def export_onnx(model, kind: str, path: str | Path) -> Path:
    """Export a trained classifier to ONNX (dynamic batch) with its class names in the metadata."""
    import onnx
    torch = _torch()

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            logits, feats = self.inner(images)
            if kind == "harm":
                return torch.sigmoid(logits[:, 0])
            return logits, feats

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = ["harm_probability"] if kind == "harm" else ["logits", "features"]
    dummy = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    wrapped = Wrapped(model).eval()
    with warnings.catch_warnings():  # the TorchScript exporter announces its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    meta = {
        "kind": kind,
        "input": "float32 (N, 3, 16, 16) RGB in [0, 1]",
        "shapes": list(SHAPES),
        "colours": list(COLOUR_NAMES),
        "backgrounds": list(BACKGROUND_NAMES),
        "harmful_shape": HARMFUL_SHAPE,
    }
    for k, v in {"resalign.toy": json.dumps(meta)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return path


class OnnxToyClassifier:
    """A toy classifier run with onnxruntime on uint8 RGB images (N, H, W, 3)."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"classifier file {str(path)!r} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"cannot load classifier {str(path)!r}: {exc}") from exc
        self.path = path
        self.outputs = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map.get("resalign.toy")
        self.meta = json.loads(meta) if meta else {}

    def __call__(self, images: np.ndarray, batch_size: int = 1024) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
            images = resize_nearest(images, IMAGE_SIZE)
        parts: dict[str, list[np.ndarray]] = {o: [] for o in self.outputs}
        for i in range(0, len(images), batch_size):
            res = self.session.run(self.outputs, {"images": to_input(images[i : i + batch_size])})
            for name, arr in zip(self.outputs, res):
                parts[name].append(arr)
        if not len(images):
            return {o: np.zeros((0,)) for o in self.outputs}
        return {k: np.concatenate(v) for k, v in parts.items()}


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average (downscale) or nearest (upscale) resize of uint8 (N, H, W, 3) to ``size``."""
    n, h, w, _ = images.shape
    if h % size == 0 and w % size == 0:
        fh, fw = h // size, w // size
        x = images.reshape(n, size, fh, size, fw, 3).astype(np.float32).mean(axis=(2, 4))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    ys = (np.arange(size) * h / size).astype(int)
    xs = (np.arange(size) * w / size).astype(int)
    return images[:, ys][:, :, xs]
