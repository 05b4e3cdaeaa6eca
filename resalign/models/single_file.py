"""Released checkpoints as compared models: a model folder, or a UNet saved as one file in the
original (CompVis / LDM) layout, as ESD and most unlearning methods release their weights.

A single file (``.safetensors``, or ``.ckpt`` / ``.pt`` read with ``torch.load(weights_only=True)``, so
nothing in it is executed) holds the UNet under ``model.diffusion_model.*`` (a whole-pipeline file
holds those keys too; the others are ignored). Its keys are converted to diffusers' with
:func:`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint` and the base model's own UNet
configuration (``--model DIR``/unet/config.json, read locally: nothing is downloaded); the text
encoder, VAE, tokenizer and scheduler are the base model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resalign.errors import ModelLoadError
from resalign.models.load import LoadedModel, load_model

#: The file suffixes read as single-file checkpoints.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: The prefix of the UNet's keys in the original layout.
LDM_UNET_PREFIX = "model.diffusion_model."


def is_single_file(spec: str | Path | None) -> bool:
    """Whether ``spec`` names a checkpoint file (rather than a folder)."""
    return spec is not None and Path(spec).suffix in SINGLE_FILE_SUFFIXES and not Path(spec).is_dir()


def check_single_file(path: str | Path, base: str | Path | None) -> None:
    """A single-file checkpoint that can be read before any work: it exists, has a known suffix, sits
    beside a base model folder (``base``, the ``--model``) and, for safetensors, holds UNet keys in the
    original layout (read from the header only)."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"checkpoint {str(p)!r} does not exist")
    if p.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"checkpoint {str(p)!r}: expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    if base is None or not (Path(base) / "unet" / "config.json").is_file():
        raise ModelLoadError(f"checkpoint {str(p)!r} holds a UNet only: --model must be the Stable Diffusion "
                             "folder it was unlearned from (its unet/config.json, text encoder and VAE)")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:  # a truncated or foreign file
            raise ModelLoadError(f"checkpoint {str(p)!r} is not a readable safetensors file: {exc}") from None
        if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
            raise ModelLoadError(f"checkpoint {str(p)!r} holds no {LDM_UNET_PREFIX}* keys: not a UNet in the "
                                 "original (CompVis) layout; give a diffusers model folder instead")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The tensors of a checkpoint file; ``.ckpt``/``.pt`` only as plain tensors (``weights_only``)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    import torch

    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, or not a torch file
        raise ModelLoadError(f"checkpoint {str(p)!r} cannot be read as plain tensors (torch.load with "
                             f"weights_only=True): {str(exc).splitlines()[0]}") from None
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"checkpoint {str(p)!r} holds no state dict")
    return sd


def unet_weights(path: str | Path, unet_config: dict[str, Any]) -> dict[str, Any]:
    """The UNet weights of a single-file checkpoint, in diffusers' names for a UNet of ``unet_config``."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    checkpoint = read_checkpoint(path)
    if not any(k.startswith(LDM_UNET_PREFIX) for k in checkpoint):
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no {LDM_UNET_PREFIX}* keys: not a UNet in the "
                             "original (CompVis) layout")
    try:
        return convert_ldm_unet_checkpoint(checkpoint, dict(unet_config))
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelLoadError(f"checkpoint {str(path)!r} does not match the base model's UNet "
                             f"configuration: {exc!r}") from None


def load_compared(spec: str | Path, base: str | Path | None, *, device: str = "cpu", dtype: str = "fp32"
                  ) -> LoadedModel:
    """A compared model: a run directory or model folder (:func:`~resalign.models.load.load_model`), or a
    single-file UNet checkpoint in the original layout on the base model folder ``base``."""
    if not is_single_file(spec):
        return load_model(spec, device=device, dtype=dtype)
    check_single_file(spec, base)
    loaded = load_model(base, device=device, dtype=dtype)
    unet = loaded.bundle.unet
    weights = unet_weights(spec, dict(unet.config))
    try:
        unet.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {str(spec)!r} does not fit the base model's UNet: "
                             f"{str(exc).splitlines()[0]} ({exc})") from None
    return LoadedModel(loaded.bundle, Path(spec).stem, str(spec), "single-file")
