"""Local weight files for the scorers: checked before any work, read without running pickled code.

Scorers of the paper's metrics (FID, CLIP score, US; Sec. 4.1, App. B.3) need networks that cannot be
shipped. They take local paths, and every problem with one is reported on one line that names the
option (``frechet.weights``, ``clip-score.model``, ...) and the file expected there.

State dicts are read with ``torch.load(weights_only=True)`` (tensors and plain containers only) or
from ``.safetensors``; a file that needs anything more is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resalign.errors import MissingWeightsError, ModelLoadError

#: Suffixes read as torch state dicts.
STATE_DICT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _given(path: str | os.PathLike, option: str, expected: str) -> Path:
    """``path`` expanded, or a :class:`MissingWeightsError` saying that ``option`` is not set."""
    if not str(path):
        raise MissingWeightsError(f"{option} is not set: give the local path of {expected}; nothing is downloaded")
    return Path(path).expanduser()


def require_file(path: str | os.PathLike, option: str, expected: str) -> Path:
    """``path`` as an existing file, or a :class:`MissingWeightsError` naming ``option`` and ``expected``."""
    p = _given(path, option, expected)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "not found"
        raise MissingWeightsError(f"{option}: {p} {what}; expected {expected}")
    return p


def require_folder(path: str | os.PathLike, option: str, expected: str, files: Mapping[str, tuple[str, ...]]) -> Path:
    """``path`` as a folder holding, for each entry of ``files``, one of its alternatives.

    ``files`` maps a description to alternative file names, e.g. ``{"weights": ("model.safetensors",
    "pytorch_model.bin")}``; the first missing one is reported with the option and the folder.
    """
    p = _given(path, option, expected)
    if not p.is_dir():
        what = "is a file, not a folder" if p.is_file() else "not found"
        raise MissingWeightsError(f"{option}: {p} {what}; expected {expected}")
    for what, names in files.items():
        if not any((p / n).is_file() for n in names):
            raise MissingWeightsError(
                f"{option}: {p} has no {what} ({' or '.join(names)}); expected {expected}"
            )
    return p


def load_state_dict(path: str | os.PathLike, option: str, expected: str) -> dict[str, Any]:
    """The tensors of a state-dict file (``.safetensors``, or torch's format read with
    ``weights_only=True``), on the CPU; errors name ``option`` and ``expected``."""
    import torch

    p = require_file(path, option, expected)
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{option}: cannot read {p} as safetensors ({exc}); expected {expected}") from exc
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, ...
        raise ModelLoadError(
            f"{option}: {p} cannot be read with torch.load(weights_only=True): it is not a torch file or "
            f"it holds more than tensors, which is never unpickled here; expected {expected} "
            f"(a plain state dict; re-save one with torch.save(model.state_dict()) or as .safetensors)"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ModelLoadError(f"{option}: {p} is not a state dict (name -> tensor); expected {expected}")
    return {str(k): v for k, v in obj.items()}


def load_tensor(path: str | os.PathLike, option: str, expected: str) -> Any:
    """One tensor from ``.npy`` (no pickles), ``.safetensors`` (its only tensor) or a torch file
    holding a tensor (``weights_only=True``), as float32 on the CPU."""
    import numpy as np
    import torch

    p = require_file(path, option, expected)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            return torch.from_numpy(np.load(p, allow_pickle=False)).float()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{option}: cannot read {p} as a numpy array ({exc}); expected {expected}") from exc
    if suffix == ".p" or suffix == ".pkl" or suffix == ".pickle":
        raise ModelLoadError(
            f"{option}: {p} is a plain pickle, which is never unpickled here; expected {expected} as .pt, "
            f".safetensors or .npy (convert it once where you trust it: python -c \"import pickle, numpy; "
            f"numpy.save('prompts.npy', numpy.asarray(pickle.load(open('{p.name}', 'rb'))))\")"
        )
    if suffix == ".safetensors":
        tensors = load_state_dict(p, option, expected)
        if len(tensors) != 1:
            raise ModelLoadError(f"{option}: {p} holds {len(tensors)} tensors, expected one ({expected})")
        return next(iter(tensors.values())).float()
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{option}: {p} cannot be read with torch.load(weights_only=True) (not a torch file, or more than "
            f"tensors, which is never unpickled here); expected {expected}"
        ) from exc
    if isinstance(obj, Mapping) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not torch.is_tensor(obj):
        raise ModelLoadError(f"{option}: {p} holds a {type(obj).__name__}, not a tensor; expected {expected}")
    return obj.detach().float()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of a model folder's weight files (``.safetensors``, ``.bin``), by file name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    return {p.name: file_sha256(p) for p in files}


def auto_device(device: str) -> str:
    """``device``, or CUDA when available and ``device`` is empty, else the CPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LocalModelConfig:
    """The options every scorer on a local transformers folder has (subclasses add theirs)."""

    #: the local transformers model folder; required
    model: str = ""
    batch_size: int = 32
    #: torch device; empty = CUDA when available, else the CPU
    device: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
