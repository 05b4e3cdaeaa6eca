"""Built-in model loaders: the embedded toy world and diffusers folders (Stable Diffusion v1.x/2.x)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

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


def load_bundle(registry, model: str | None, device: str) -> T2IBundle:
    """``model`` (None: the embedded toy model) through the first registered loader that claims it,
    every plugin's included and the generic diffusers one last.

    fp32 throughout: a run's ``dtype`` is the autocast dtype of the UNet passes (the master weights stay
    fp32); the frozen text encoder and VAE run once per dataset, and the saved model keeps their dtype.
    """
    from resalign.errors import ModelLoadError

    loader = None
    if model is None:
        loader = registry.create("model", "toy")
    else:
        for name in sorted(registry.names("model"), key=lambda n: n == "diffusers"):
            candidate = registry.create("model", name)
            if candidate.can_load(model):
                loader = candidate
                break
        if loader is None:
            raise ModelLoadError(f"model: no loader can read {model!r}")
    return loader.load(model, device=device, dtype="fp32")
