"""Loading a model by what a command names: a diffusers folder, a run directory's model, or the toy model.

The loader is chosen among the registered ``model`` plugins, the most specific first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resalign.errors import ModelLoadError


@dataclass
class LoadedModel:
    bundle: Any
    label: str  # how reports name it
    path: str | None  # the diffusers folder it came from (None: the shipped toy model)
    loader: str


def model_folder(spec: str | Path | None) -> Path | None:
    """The diffusers folder behind ``spec``: a run directory's ``model/``, or the folder itself.

    None (or ``"toy"``) stands for the shipped toy model. Anything else that is neither raises
    :class:`ModelLoadError` naming the path, before any work starts.
    """
    if spec is None or str(spec) == "toy":
        return None
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"model or run directory {str(path)!r} does not exist")
    if (path / "model" / "unet").is_dir():
        return path / "model"
    if (path / "unet").is_dir():
        return path
    raise ModelLoadError(
        f"{str(path)!r} is neither a diffusers model folder (with unet/) nor a run directory (with model/unet/)"
    )


def load_model(spec: str | Path | None, *, device: str = "cpu", dtype: str = "fp32") -> LoadedModel:
    """Load a model folder, a run directory's model or (None) the shipped toy model, with the loader
    :func:`~resalign.models.loaders.choose_loader` picks."""
    from resalign.models.loaders import choose_loader
    from resalign.registry import get_registry

    folder = model_folder(spec)
    arg = None if folder is None else str(folder)
    name, loader = choose_loader(get_registry(), arg)
    bundle = loader.load(arg, device=device, dtype=dtype)
    if folder is None:
        label = "toy-base"
    else:
        label = Path(spec).name if folder.name == "model" else folder.name
    return LoadedModel(bundle, label, arg, name)
