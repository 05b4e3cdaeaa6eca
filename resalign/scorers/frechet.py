"""``frechet`` scorer: Fréchet distance between the features of the scored images and reference
feature statistics.

Features come from a pluggable :class:`FeatureExtractor`: by default one loaded from the
``feature_model`` file (an ONNX model run by onnxruntime, or a TorchScript module), e.g. an
Inception network the user exported; the toy world passes its classifier's feature function.
Reference statistics are an ``.npz`` with ``mu``/``sigma`` (pytorch-fid's ``--save-stats``
format) or a folder of images, whose statistics are computed once and cached.

No weights are shipped or downloaded: without ``feature_model`` (and no extractor given in code)
scoring real images fails with :class:`~resalign.errors.MissingWeightsError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from resalign.components import Component, ScoreResult
from resalign.errors import ConfigError, DataError, MissingWeightsError, ModelLoadError
from resalign.metrics.frechet import FeatureAccumulator, FeatureStats, frechet_from_features

__all__ = [
    "FeatureExtractor",
    "FeatureStats",
    "FrechetScorer",
    "ImagePreprocessing",
    "OnnxFeatureExtractor",
    "TorchScriptFeatureExtractor",
    "frechet_from_features",
    "load_feature_extractor",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 RGB images (N, H, W, 3) to features (N, d) (float32 or float64)."""

    #: a short description recorded in score details (e.g. the model file)
    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ImagePreprocessing:
    """uint8 RGB (N, H, W, 3) -> float32 model input.

    Bilinear resize to ``size`` × ``size`` (none when ``size`` is 0), multiply by ``scale``, then
    per channel ``(x − mean) / std``; ``channel_order`` "RGB" or "BGR"; ``layout`` "NCHW" or
    "NHWC".
    """

    size: int = 0
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ConfigError("mean and std must have 3 entries each, std non-zero")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        if self.size:
            images = resize_bilinear(images, self.size)
        x = images.astype(np.float32) * np.float32(self.scale)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)


def check_images(images: np.ndarray) -> np.ndarray:
    """``images`` as uint8 (N, H, W, 3), or a DataError naming the problem."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"images must be a uint8 (N, H, W, 3) RGB array, got {images.dtype} {images.shape}"
        )
    return images


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W, 3) images to (N, size, size, 3) with PIL's bilinear filter."""
    from PIL import Image

    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
    )


def _flatten_features(out: Any, n: int) -> np.ndarray:
    feats = np.asarray(out)
    if feats.ndim < 2 or feats.shape[0] != n:
        raise ModelLoadError(
            f"feature model returned shape {feats.shape} for {n} images; expected (N, d, ...)"
        )
    return feats.reshape(n, -1)


class OnnxFeatureExtractor:
    """Features from an ONNX model (first input, ``output`` or the first output), flattened."""

    def __init__(
        self,
        path: str | os.PathLike,
        preprocessing: ImagePreprocessing,
        *,
        output: str = "",
        providers: Sequence[str] = (),
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        from resalign.scorers.nudenet import default_providers

        self.path = Path(path)
        self.preprocessing = preprocessing
        self.name = f"onnx:{self.path.name}"
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=list(providers) or default_providers()
            )
        except Exception as exc:  # onnxruntime's own exception types
            raise ModelLoadError(f"cannot load ONNX feature model {self.path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if output and output not in names:
            raise ConfigError(f"feature_output {output!r} is not an output of {self.path} ({names})")
        self.output_name = output or names[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = self.preprocessing(images)
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        return _flatten_features(out, x.shape[0])


class TorchScriptFeatureExtractor:
    """Features from a TorchScript module (``torch.jit.load``) or an exported program (``.pt2``,
    ``torch.export.load``), flattened; no gradients."""

    def __init__(
        self, path: str | os.PathLike, preprocessing: ImagePreprocessing, *, device: str = "cpu"
    ) -> None:
        import torch

        self.path = Path(path)
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        exported = self.path.suffix.lower() == ".pt2"
        self.name = f"{'torch-export' if exported else 'torchscript'}:{self.path.name}"
        try:
            if exported:
                self.module = torch.export.load(str(self.path)).module().to(self.device)
            else:
                self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as exc:  # torch raises RuntimeError and friends
            raise ModelLoadError(f"cannot load TorchScript feature model {self.path}: {exc}") from exc

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(self.preprocessing(images)).to(self.device)
        with torch.inference_mode():
            out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return _flatten_features(out.float().cpu().numpy(), x.shape[0])


def load_feature_extractor(
    path: str | os.PathLike,
    preprocessing: ImagePreprocessing,
    *,
    output: str = "",
    providers: Sequence[str] = (),
    threads: int = 0,
    device: str = "cpu",
) -> FeatureExtractor:
    """An extractor for ``path``: ``.onnx`` through onnxruntime, ``.pt``/``.pth``/``.ts``/``.jit``
    through ``torch.jit.load``, ``.pt2`` through ``torch.export.load``."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"feature_model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxFeatureExtractor(
            path, preprocessing, output=output, providers=providers, threads=threads
        )
    if suffix in (".pt", ".pth", ".ts", ".jit", ".torchscript", ".pt2"):
        return TorchScriptFeatureExtractor(path, preprocessing, device=device)
    raise ConfigError(
        f"feature_model {path}: unknown format {suffix!r}; give an .onnx file, a TorchScript "
        "module (.pt, .pth, .ts) or an exported program (.pt2)"
    )


def _iter_image_batches(folder: Path, batch_size: int, size: int) -> Iterator[np.ndarray]:
    """uint8 RGB batches of the images in ``folder`` (sorted by name); resized to ``size`` when
    non-zero, otherwise all images must share one size."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"reference folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    for start in range(0, len(files), batch_size):
        batch = []
        for p in files[start : start + batch_size]:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size:
                    im = im.resize((size, size), Image.BILINEAR)
                batch.append(np.asarray(im))
        shapes = {b.shape for b in batch}
        if len(shapes) > 1:
            raise DataError(
                f"reference images in {folder} have different sizes {sorted(shapes)}; set "
                "input_size to resize them"
            )
        yield np.stack(batch)


class FrechetScorer(Component):
    """Fréchet distance between the scored images' features and reference statistics."""

    name: ClassVar[str] = "frechet"
    metric: ClassVar[str] = "frechet_distance"

    @dataclass
    class Config:
        #: feature network: .onnx (onnxruntime), TorchScript (.pt/.pth/.ts) or torch.export (.pt2);
        #: required for real images
        feature_model: str = ""
        #: reference statistics (.npz with mu, sigma) or a folder of reference images
        reference: str = ""
        #: ONNX output to read (default: the first)
        feature_output: str = ""
        #: preprocessing of the feature model's input (see ImagePreprocessing)
        input_size: int = 0
        scale: float = 1.0 / 255.0
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
        std: tuple[float, float, float] = (1.0, 1.0, 1.0)
        channel_order: str = "RGB"
        layout: str = "NCHW"
        batch_size: int = 50
        providers: tuple[str, ...] = ()
        #: onnxruntime intra-op threads (0 = its default)
        threads: int = 0
        device: str = "cpu"
        #: where statistics of reference folders are cached
        cache_dir: str = "~/.cache/resalign/frechet"

        def __post_init__(self) -> None:
            self.mean = tuple(self.mean)
            self.std = tuple(self.std)
            self.providers = tuple(self.providers)
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    #: in-process cache of loaded reference statistics: (path, mtime_ns, size, extractor) -> stats
    _reference_cache: ClassVar[dict[tuple, FeatureStats]] = {}

    def __init__(self, config: Any = None, *, extractor: FeatureExtractor | None = None) -> None:
        super().__init__(config)
        self._extractor = extractor

    def preprocessing(self) -> ImagePreprocessing:
        c = self.config
        return ImagePreprocessing(
            size=c.input_size,
            scale=c.scale,
            mean=c.mean,
            std=c.std,
            channel_order=c.channel_order,
            layout=c.layout,
        )

    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor: given in code, or loaded from ``feature_model``."""
        if self._extractor is None:
            if not self.config.feature_model:
                raise MissingWeightsError(
                    "frechet scorer: option 'feature_model' is not set. Fréchet distance on real "
                    "images needs a feature network (e.g. an Inception-v3 exported to ONNX or "
                    "TorchScript) given by local path: --scorer-option feature_model=PATH; "
                    "nothing is downloaded"
                )
            c = self.config
            self._extractor = load_feature_extractor(
                Path(c.feature_model).expanduser(),
                self.preprocessing(),
                output=c.feature_output,
                providers=c.providers,
                threads=c.threads,
                device=c.device,
            )
        return self._extractor

    def feature_stats(self, images: np.ndarray | Iterator[np.ndarray]) -> FeatureStats:
        """Gaussian fit of the features of ``images`` (an array or an iterator of batches)."""
        batches = [check_images(images)] if isinstance(images, np.ndarray) else images
        acc: FeatureAccumulator | None = None
        bs = self.config.batch_size
        for batch in batches:
            for start in range(0, batch.shape[0], bs):
                feats = self.extractor(batch[start : start + bs])
                if acc is None:
                    acc = FeatureAccumulator(feats.shape[1])
                acc.update(feats)
        if acc is None or acc.count < 2:
            raise DataError("frechet scorer needs at least 2 images")
        return FeatureStats.from_accumulator(acc)

    def reference_stats(self) -> FeatureStats:
        """Reference statistics from ``reference`` (.npz, or an image folder, cached)."""
        if not self.config.reference:
            raise ConfigError(
                "frechet scorer: option 'reference' is not set; give an .npz with mu/sigma "
                "(e.g. from pytorch-fid --save-stats) or a folder of reference images"
            )
        path = Path(self.config.reference).expanduser().resolve()
        if not path.exists():
            raise DataError(f"frechet scorer: reference {path} does not exist")
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, self.extractor_id())
        cached = self._reference_cache.get(key)
        if cached is None:
            cached = FeatureStats.load(path) if path.is_file() else self._folder_stats(path)
            self._reference_cache[key] = cached
        return cached

    def extractor_id(self) -> str:
        """Identity of the features: the model file (path, size, mtime) or the extractor's name,
        plus the preprocessing."""
        ext = self.extractor
        path = getattr(ext, "path", None)
        if path is not None:
            st = Path(path).stat()
            model = f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"
        else:
            model = getattr(ext, "name", type(ext).__name__)
        return f"{model}|{self.preprocessing()}|{self.config.feature_output}"

    def _folder_stats(self, folder: Path) -> FeatureStats:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        h = hashlib.sha256(self.extractor_id().encode())
        for p in files:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        cache = Path(self.config.cache_dir).expanduser() / f"{h.hexdigest()[:32]}.npz"
        if cache.is_file():
            return FeatureStats.load(cache)
        stats = self.feature_stats(
            _iter_image_batches(folder, self.config.batch_size, self.config.input_size)
        )
        stats.save(cache)
        return stats

    def score(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> ScoreResult:
        """Fréchet distance between the Gaussian fits of ``images``' features and the reference."""
        extractor = self.extractor  # MissingWeightsError first: nothing works without features
        reference = self.reference_stats()
        stats = self.feature_stats(images)
        value = stats.frechet_distance(reference)
        return ScoreResult(
            metric=self.metric,
            value=value,
            details={
                "features": getattr(extractor, "name", type(extractor).__name__),
                "feature_dim": stats.dim,
                "reference": str(self.config.reference),
                "reference_count": reference.count,
                "n_images": stats.count,
            },
        )


SCORERS = (FrechetScorer,)
