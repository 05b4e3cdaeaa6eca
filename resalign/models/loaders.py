"""Built-in model loaders: the embedded toy world and diffusers folders (Stable Diffusion v1.x/2.x)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from resalign.components import Component
from resalign.hookspecs import hookimpl
from resalign.models.bundle import T2IBundle


class DiffusersFolder(Component):
    """A folder in diffusers layout (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``vae/``)."""

    name: ClassVar[str] = "diffusers"

    def can_load(self, path: str | None) -> bool:
        return path is not None and (Path(path) / "unet").is_dir()

    def load(self, path: str | None, device: str = "cpu", dtype: str = "fp32") -> T2IBundle:
        return T2IBundle.load(path, device=device, dtype=dtype)


class ToyModel(Component):
    """The embedded toy world's model (shipped in ``resalign/assets/toy/model``), or a toy model folder."""

    name: ClassVar[str] = "toy"

    def can_load(self, path: str | None) -> bool:
        if path is None:
            return True
        index = Path(path) / "model_index.json"
        return index.is_file() and "ResAlignToyPipeline" in index.read_text(errors="replace")

    def load(self, path: str | None, device: str = "cpu", dtype: str = "fp32") -> T2IBundle:
        from resalign.models.toy import load_toy

        return load_toy(path, device=device, dtype=dtype)


@hookimpl
def register_models(register):
    register("diffusers", DiffusersFolder)
    register("toy", ToyModel)


def choose_loader(registry, model: str | None) -> tuple[str, Any]:
    """The name and an instance of the first registered ``model`` loader that claims ``model`` (None:
    the embedded toy model): every plugin's loader before the generic diffusers one."""
    from resalign.errors import ModelLoadError

    for name in sorted(registry.names("model"), key=lambda n: n == "diffusers"):
        candidate = registry.create("model", name)
        if candidate.can_load(model):
            return name, candidate
    raise ModelLoadError(f"model: no loader can read {model or 'the embedded toy model'!r}")


def load_bundle(registry, model: str | None, device: str) -> T2IBundle:
    """``model`` (None: the embedded toy model) through :func:`choose_loader`.

    fp32 throughout: a run's ``dtype`` is the autocast dtype of the UNet passes (the master weights stay
    fp32); the frozen text encoder and VAE run once per dataset, and the saved model keeps their dtype.
    """
    return choose_loader(registry, model)[1].load(model, device=device, dtype="fp32")
