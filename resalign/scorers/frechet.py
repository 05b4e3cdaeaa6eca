"""``frechet`` scorer: Fréchet distance between the features of the scored images and reference
feature statistics (FID, App. B.3, when the features are pytorch-fid's Inception).

Features come from a pluggable :class:`FeatureExtractor`:

* ``weights``: pytorch-fid's Inception-v3 FID network from the user's local
  ``pt_inception-2015-12-05-6726825d.pth`` (:mod:`resalign.scorers.fid_inception`), the block chosen
  by ``dims`` as pytorch-fid's ``--dims``; an ``.onnx`` file there is run by onnxruntime;
* ``feature_model``: any network the user exported (ONNX, TorchScript, ``torch.export``), with the
  preprocessing options;
* an extractor given in code (the toy world passes its classifier's feature function).

Reference statistics are an ``.npz`` with ``mu``/``sigma`` (pytorch-fid's ``--save-stats`` format)
or a folder of images, whose statistics are computed once and cached. Features are streamed batch
by batch through the native statistics kernel (:class:`~resalign.metrics.frechet.FeatureAccumulator`).

No weights are shipped or downloaded: a scorer without weights (and no extractor given in code)
fails with :class:`~resalign.errors.MissingWeightsError` naming the option and the file expected.
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
from resalign.scorers.images import check_images
from resalign.scorers.onnx_runtime import onnx_session
from resalign.scorers.weights import STATE_DICT_SUFFIXES, file_sha256, require_file

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

_FID_EXPECTED = "pytorch-fid's Inception-v3 FID weights (pt_inception-2015-12-05-6726825d.pth) or an .onnx network"


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

    @classmethod
    def of(cls, options: Any) -> ImagePreprocessing:
        """The preprocessing of a scorer's options (``input_size``, ``scale``, ``mean``, ``std``,
        ``channel_order``, ``layout``)."""
        return cls(size=options.input_size, scale=options.scale, mean=options.mean, std=options.std,
                   channel_order=options.channel_order, layout=options.layout)

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
        self.path = Path(path)
        self.preprocessing = preprocessing
        self.name = f"onnx:{self.path.name}"
        self.session = onnx_session(
            self.path, providers=providers, threads=threads, error="cannot load ONNX feature model"
        )
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
                f"reference images in {folder} have different sizes {sorted(shapes)}; resize them to one "
                "size (as pytorch-fid needs), or set input_size for a feature_model"
            )
        yield np.stack(batch)


class FrechetScorer(Component):
    """Fréchet distance between the scored images' features and reference statistics."""

    name: ClassVar[str] = "frechet"
    metric: ClassVar[str] = "frechet_distance"

    @dataclass
    class Config:
        #: pytorch-fid's Inception-v3 FID weights (pt_inception-2015-12-05-6726825d.pth, or a
        #: .safetensors of the same state dict), or an .onnx feature network
        weights: str = ""
        #: pytorch-fid's --dims: 64, 192, 768 or 2048 (pool features, the standard FID)
        dims: int = 2048
        #: another feature network: .onnx (onnxruntime), TorchScript (.pt/.pth/.ts) or
        #: torch.export (.pt2), with the preprocessing options below
        feature_model: str = ""
        #: reference statistics (.npz with mu, sigma) or a folder of reference images
        reference: str = ""
        #: ONNX output to read (default: the first)
        feature_output: str = ""
        #: preprocessing of an ONNX / TorchScript feature model's input (see ImagePreprocessing);
        #: pytorch-fid's network takes images as pytorch-fid feeds them and resizes them itself
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
        #: torch device of the feature network; empty = CUDA when available, else the CPU
        device: str = ""
        #: where statistics of reference folders are cached
        cache_dir: str = "~/.cache/resalign/frechet"

        def __post_init__(self) -> None:
            from resalign.scorers.fid_inception import FID_DIMS

            self.mean = tuple(self.mean)
            self.std = tuple(self.std)
            self.providers = tuple(self.providers)
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
            if self.dims not in FID_DIMS:
                raise ValueError(f"dims must be one of {', '.join(map(str, FID_DIMS))} (pytorch-fid's --dims), "
                                 f"got {self.dims}")
            if self.weights and self.feature_model:
                raise ValueError("give either weights (pytorch-fid's Inception) or feature_model, not both")
            if self.weights and self.input_size and not self.weights.lower().endswith(".onnx"):
                raise ValueError("input_size does not apply to pytorch-fid's Inception (it resizes to 299 "
                                 "itself, and reference images are read unresized, as pytorch-fid does)")

    #: in-process cache of loaded reference statistics: (path, mtime_ns, size, extractor) -> stats
    _reference_cache: ClassVar[dict[tuple, FeatureStats]] = {}

    def __init__(self, config: Any = None, *, extractor: FeatureExtractor | None = None) -> None:
        super().__init__(config)
        self._extractor = extractor
        self._weights_sha256: str | None = None
        c = self.config
        if extractor is None and c.weights:
            suffix = Path(c.weights).suffix.lower()
            if suffix != ".onnx" and suffix not in STATE_DICT_SUFFIXES:
                raise ConfigError(f"frechet.weights: {c.weights} is neither a state dict "
                                  f"({', '.join(STATE_DICT_SUFFIXES)}) nor an .onnx file; expected {_FID_EXPECTED}")
            require_file(c.weights, "frechet.weights", _FID_EXPECTED)
        if extractor is None and c.feature_model:
            require_file(c.feature_model, "frechet.feature_model", "a feature network (.onnx, TorchScript, .pt2)")

    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing.of(self.config)

    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor: given in code, or loaded from ``weights`` / ``feature_model``."""
        if self._extractor is None:
            c = self.config
            if c.weights and Path(c.weights).suffix.lower() != ".onnx":
                from resalign.scorers.fid_inception import FidInceptionExtractor

                self._extractor = FidInceptionExtractor(c.weights, c.dims, device=c.device)
            elif c.weights or c.feature_model:
                self._extractor = load_feature_extractor(
                    Path(c.weights or c.feature_model).expanduser(),
                    self.preprocessing(),
                    output=c.feature_output,
                    providers=c.providers,
                    threads=c.threads,
                    device=c.device or "cpu",
                )
            else:
                raise MissingWeightsError(
                    "frechet.weights is not set: FID on real images needs pytorch-fid's Inception-v3 weights "
                    f"({_FID_EXPECTED}) given by local path, --scorer-option frechet.weights=PATH (or another "
                    "feature network as frechet.feature_model=PATH, e.g. an .onnx); nothing is downloaded"
                )
        return self._extractor

    def _reads_like_pytorch_fid(self) -> bool:
        from resalign.scorers.fid_inception import FidInceptionExtractor

        return isinstance(self._extractor, FidInceptionExtractor)

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
        name = getattr(ext, "name", type(ext).__name__)
        if path is not None:
            st = Path(path).stat()
            model = f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}|{name}"
        else:
            model = name
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
        size = 0 if self._reads_like_pytorch_fid() else self.config.input_size
        stats = self.feature_stats(_iter_image_batches(folder, self.config.batch_size, size))
        stats.save(cache)
        return stats

    def score(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> ScoreResult:
        """Fréchet distance between the Gaussian fits of ``images``' features and the reference."""
        details = self.details()  # loads the features: MissingWeightsError before anything else
        reference = self.reference_stats()
        stats = self.feature_stats(images)
        value = stats.frechet_distance(reference)
        details.update(feature_dim=stats.dim, reference_count=reference.count, n_images=stats.count)
        return ScoreResult(metric=self.metric, value=value, details=details)

    def details(self) -> dict[str, Any]:
        """The features (network, weights file and SHA-256, pytorch-fid's dims) and the reference."""
        extractor = self.extractor
        details: dict[str, Any] = {
            "features": getattr(extractor, "name", type(extractor).__name__),
            "reference": str(self.config.reference),
        }
        path = getattr(extractor, "path", None)
        if path is not None:
            if self._weights_sha256 is None:
                self._weights_sha256 = file_sha256(path)
            details["weights"] = Path(path).name
            details["weights_sha256"] = self._weights_sha256
        if self._reads_like_pytorch_fid():
            import importlib.metadata

            details["dims"] = self.config.dims
            details["pytorch_fid_version"] = importlib.metadata.version("pytorch-fid")
        return details


SCORERS = (FrechetScorer,)
