"""Image-caption folders: images plus ``metadata.jsonl`` (or ``metadata.csv``) with file_name, prompt.

This is the layout of Hugging Face ``imagefolder`` datasets and the one every resalign command reads
and writes::

    DIR/metadata.jsonl     {"file_name": "00000.png", "prompt": "a red circle"}   (one object a line)
    DIR/00000.png ...

A ``metadata.csv`` with ``file_name`` and ``prompt`` columns is read the same way (``text`` and
``caption`` are accepted as the prompt column). Bad input raises :class:`DataError` naming the file,
line and field.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resalign.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
PROMPT_COLUMNS = ("prompt", "text", "caption")


@dataclass
class ImageCaptionFolder:
    """Images as uint8 RGB (N, H, W, 3), their prompts and file names."""

    images: np.ndarray
    prompts: list[str]
    file_names: list[str]
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def _rows_jsonl(text: str, path: Path) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object with file_name and prompt")
        rows.append((lineno, obj))
    return rows


def _rows_csv(text: str, path: Path) -> list[tuple[int, dict]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV file (expected a header with file_name,prompt)")
        reader.fieldnames = [c.strip() if isinstance(c, str) else c for c in reader.fieldnames]
        return [(i + 2, row) for i, row in enumerate(reader)]
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV file ({exc})") from None


def parse_metadata(text: str, path: str | os.PathLike) -> list[tuple[str, str]]:
    """(file_name, prompt) pairs from the text of ``metadata.jsonl`` (``.jsonl``) or ``metadata.csv``.

    Each ``file_name`` must be a relative path inside the folder; errors name ``path``, line and field.
    """
    meta = Path(path)
    rows = _rows_jsonl(text, meta) if meta.suffix == ".jsonl" else _rows_csv(text, meta)
    if not rows:
        raise DataError(f"{meta}: no entries")
    out = []
    for lineno, row in rows:
        name = row.get("file_name")
        if not name or not isinstance(name, str):
            raise DataError(f"{meta}:{lineno}: missing field 'file_name'")
        if "\x00" in name or Path(name).is_absolute() or ".." in Path(name).parts or name.startswith(("/", "\\")):
            raise DataError(f"{meta}:{lineno}: field 'file_name' must be a relative path inside the folder, "
                            f"got {name!r}")
        col = next((c for c in PROMPT_COLUMNS if c in row), None)
        if col is None:
            raise DataError(f"{meta}:{lineno}: missing field 'prompt'")
        prompt = row[col]
        if prompt is None or not isinstance(prompt, str):
            raise DataError(f"{meta}:{lineno}: field {col!r} must be a string, got {prompt!r}")
        out.append((name, prompt))
    return out


def read_metadata(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(file_name, prompt) pairs of an image-caption folder, validated."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image-caption folder {str(root)!r} does not exist or is not a directory")
    meta = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    if meta is None:
        raise DataError(f"{root}: no metadata.jsonl or metadata.csv (with file_name and prompt) found")
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{meta} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except OSError as exc:
        raise DataError(f"{meta} cannot be read: {exc.strerror or exc}") from None
    return parse_metadata(text, meta)


def load_image(path: Path, size: int | None = None) -> np.ndarray:
    """One image as uint8 RGB (H, W, 3), optionally resized (bicubic) to ``size`` x ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"image file {str(path)!r} listed in the metadata does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from None


def unreadable_image(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be decoded as an image (None when it can): the file is opened and decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return str(exc) or type(exc).__name__
    return None


def read_folder(root: str | os.PathLike, size: int | None = None, limit: int | None = None) -> ImageCaptionFolder:
    """Read an image-caption folder; images resized to ``size`` when given (else all must match)."""
    root = Path(root)
    pairs = read_metadata(root)
    if limit is not None:
        pairs = pairs[:limit]
    images = []
    for name, _ in pairs:
        img = load_image(root / name, size)
        if images and img.shape != images[0].shape:
            raise DataError(
                f"{root / name}: image size {img.shape[1]}x{img.shape[0]} differs from "
                f"{images[0].shape[1]}x{images[0].shape[0]} of {pairs[0][0]!r}; pass a size to resize"
            )
        images.append(img)
    return ImageCaptionFolder(np.stack(images), [p for _, p in pairs], [n for n, _ in pairs], root)


def write_folder(
    root: str | os.PathLike, images: np.ndarray, prompts: Sequence[str], *, fmt: str = "jsonl",
    prefix: str = "",
) -> Path:
    """Write images (uint8 RGB (N, H, W, 3)) as PNG files plus ``metadata.jsonl`` (or ``.csv``)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != len(prompts):
        raise DataError(f"{len(images)} images but {len(prompts)} prompts")
    if fmt not in ("jsonl", "csv"):
        raise DataError(f"metadata format {fmt!r}: expected 'jsonl' or 'csv'")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(images))))
    names = []
    for i, img in enumerate(images):
        name = f"{prefix}{i:0{width}d}.png"
        Image.fromarray(img, "RGB").save(root / name)
        names.append(name)
    if fmt == "jsonl":
        text = "".join(json.dumps({"file_name": n, "prompt": p}) + "\n" for n, p in zip(names, prompts))
        (root / "metadata.jsonl").write_text(text, encoding="utf-8")
    else:
        with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "prompt"])
            w.writerows(zip(names, prompts))
    return root


def save_grid(images: np.ndarray, path: str | os.PathLike, ncols: int | None = None, scale: int = 4,
              pad: int = 1) -> Path:
    """Save uint8 RGB images (N, H, W, 3) as one PNG grid, each image upscaled ``scale`` x (nearest)."""
    from PIL import Image

    images = np.asarray(images)
    n, h, w, _ = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    big = images.repeat(scale, 1).repeat(scale, 2)
    H, W = h * scale, w * scale
    grid = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = big[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, "RGB").save(path)
    return path
