"""The SDXL layout of a diffusers folder: what makes one, and the checks made before any weight is read.

An SDXL folder (``StableDiffusionXLPipeline``) holds a second text encoder and tokenizer
(``text_encoder_2/``, ``tokenizer_2/``) and a UNet with ``addition_embed_type = "text_time"``: its
added embedding reads the second encoder's projected pooled output and six time ids (original size,
crop top-left, target size), each embedded in ``addition_time_embed_dim`` features, and its
cross-attention reads both encoders' hidden states side by side. A folder whose parts disagree on
those sizes would fail deep inside the first UNet call (or, with a missing part, be run with the
wrong conditioning); :func:`check_sdxl_folder` names the part in one line instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resalign.errors import ModelLoadError

#: The time ids of SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w).
N_TIME_IDS = 6


def _config(path: Path, what: str) -> dict[str, Any]:
    file = path / what
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{str(file)!r} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{str(file)!r} is not valid JSON: {exc}") from exc


def is_sdxl_folder(path: str | Path) -> bool:
    """Whether ``path`` is in SDXL layout: a ``StableDiffusionXLPipeline`` index, a second text
    encoder or tokenizer, or a UNet with the ``text_time`` added embedding."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file() and "StableDiffusionXL" in index.read_text(errors="replace"):
        return True
    if (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir():
        return True
    unet = path / "unet" / "config.json"
    try:
        return unet.is_file() and json.loads(unet.read_text()).get("addition_embed_type") == "text_time"
    except (OSError, json.JSONDecodeError):
        return False


def check_sdxl_folder(path: str | Path) -> None:
    """Raise :class:`ModelLoadError` (one line, naming the part) unless the SDXL folder ``path`` has
    both text encoders and tokenizers and its UNet's sizes fit them: ``addition_embed_type =
    "text_time"``, ``projection_class_embeddings_input_dim = addition_time_embed_dim × 6 +
    text_encoder_2.projection_dim`` and ``cross_attention_dim = text_encoder.hidden_size +
    text_encoder_2.hidden_size``. Reads configs only."""
    path = Path(path)
    missing = [p for p in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(
            f"SDXL model folder {str(path)!r} lacks {', '.join(missing)}: the SDXL layout needs text_encoder/, "
            "text_encoder_2/, tokenizer/ and tokenizer_2/ beside unet/"
        )
    unet = _config(path, "unet/config.json")
    te1 = _config(path, "text_encoder/config.json")
    te2 = _config(path, "text_encoder_2/config.json")
    where = str(path / "unet" / "config.json")
    if unet.get("addition_embed_type") != "text_time":
        raise ModelLoadError(
            f"{where!r}: addition_embed_type is {unet.get('addition_embed_type')!r}, expected 'text_time' "
            "(the SDXL UNet's pooled-embedding and time-ids conditioning)"
        )
    time_dim, proj = unet.get("addition_time_embed_dim"), te2.get("projection_dim")
    expected = (time_dim or 0) * N_TIME_IDS + (proj or 0)
    got = unet.get("projection_class_embeddings_input_dim")
    if time_dim is None or got != expected:
        raise ModelLoadError(
            f"{where!r}: projection_class_embeddings_input_dim is {got}, but {N_TIME_IDS} time ids × "
            f"addition_time_embed_dim {time_dim} + text_encoder_2's projection_dim {proj} = {expected}: "
            "the time_ids size does not match the UNet"
        )
    cross = unet.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, list) else cross
    width = te1.get("hidden_size", 0) + te2.get("hidden_size", 0)
    if cross != width:
        raise ModelLoadError(
            f"{where!r}: cross_attention_dim is {cross}, expected text_encoder's hidden_size "
            f"{te1.get('hidden_size')} + text_encoder_2's {te2.get('hidden_size')} = {width}"
        )


def weights_variant(folder: Path) -> str | None:
    """``"fp16"`` when ``folder`` holds its weights only as the fp16 variant (``*.fp16.safetensors``,
    as SDXL checkpoints are often shipped), else None (the plain files)."""
    files = [f.name for f in folder.glob("*.safetensors")] + [f.name for f in folder.glob("*.bin")]
    plain = [f for f in files if ".fp16." not in f]
    return "fp16" if not plain and any(".fp16." in f for f in files) else None
