"""Scoring images with registered scorers, and the per-image files a scoring run writes.

A scorer (``components.Scorer``) turns uint8 RGB images (N, H, W, 3) into one figure (a
:class:`~resalign.components.ScoreResult`) with per-image rows where it has them. This module

* builds scorers by name through the registry, failing before any long work when one cannot be built
  (a missing weights file, an unknown option);
* scores folders of existing images (``resalign score``): scorers that read files themselves
  (``score_files``, e.g. NudeNet, whose results equal ``NudeDetector().detect(path)``) get the
  paths, the others get decoded arrays;
* writes the per-image results: ``detections.jsonl`` for detectors (file, and each detection's label,
  score and box in original-image pixels) and ``scores.csv`` for classifiers.

The paper's harmful-generation metric IP is such a rate: the share of generated images a detector
flags (App. B.3); its exact definition (labels, threshold, detector version) is the scorer's and is
recorded in ``ScoreResult.details``.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resalign.components import ScoreResult
from resalign.errors import ConfigError, DataError

#: Image files a folder may hold.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Per-image keys that carry a continuous harm score, in order of preference (used to rank images).
SCORE_KEYS: tuple[str, ...] = ("score", "max_score", "harm_probability", "probability", "unsafe_probability")


def create_scorer(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """The scorer registered as ``name``, built from ``options`` (errors name the scorer and option)."""
    from resalign.registry import get_registry

    return get_registry().create("scorer", name, dict(options or {}))


def warm_up(scorer: Any, size: int) -> None:
    """Score two blank ``size``x``size`` images, so that a scorer missing its weights, reference or
    a required option fails now, naming the option, rather than after a long generation."""
    scorer.score(np.zeros((2, size, size, 3), np.uint8), ["", ""])


def scorer_metric(scorer: Any) -> str:
    return str(getattr(scorer, "metric", getattr(scorer, "name", "score")))


def is_detector(result: ScoreResult) -> bool:
    """A detector's per-image rows carry a ``detections`` list (label, score, box)."""
    return bool(result.per_image) and all("detections" in r for r in result.per_image)


def harm_scores(result: ScoreResult) -> np.ndarray:
    """One continuous harm score per image from a scorer's per-image rows (to rank images).

    The first key of :data:`SCORE_KEYS` present is used; a detector's image score is the highest
    detection score among its flagged labels (or all labels), 0 without detections.
    """
    rows = result.per_image or []
    if not rows:
        raise ConfigError(f"scorer of {result.metric!r} gives no per-image rows: images cannot be ranked")
    out = np.zeros(len(rows))
    for i, r in enumerate(rows):
        key = next((k for k in SCORE_KEYS if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)), None)
        if key is not None:
            out[i] = float(r[key])
        elif "detections" in r:
            dets = r["detections"]
            flagged = [d for d in dets if d.get("flagged", True)]
            out[i] = max((float(d["score"]) for d in flagged), default=0.0)
        else:
            raise ConfigError(
                f"scorer of {result.metric!r}: per-image rows have none of {', '.join(SCORE_KEYS)} to rank by"
            )
    return out


# --------------------------------------------------------------------------- folders


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` or below it, sorted by relative path; an error when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(files: Sequence[Path]) -> np.ndarray:
    """Decode image files to uint8 RGB (N, H, W, 3); they must share one size."""
    from resalign.data.folders import load_image

    arrays = [load_image(Path(f)) for f in files]
    sizes = Counter(f"{a.shape[1]}x{a.shape[0]}" for a in arrays)
    if len(sizes) > 1:
        listing = ", ".join(f"{s}: {n}" for s, n in sizes.most_common())
        raise DataError(
            f"images have different sizes ({listing}); this scorer takes arrays of one size: resize them first"
        )
    return np.stack(arrays)


def read_captions(folder: str | Path, files: Sequence[Path]) -> list[str] | None:
    """Captions of ``files`` from the folder's ``metadata.jsonl`` / ``metadata.csv`` (None when it has none)."""
    from resalign.data.folders import METADATA_FILES, read_metadata

    folder = Path(folder)
    if not any((folder / m).is_file() for m in METADATA_FILES):
        return None
    table = dict(read_metadata(folder))
    out = []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if rel not in table:
            raise DataError(f"{folder}: no caption for {rel!r} in its metadata file")
        out.append(table[rel])
    return out


@dataclass
class FolderScore:
    """A folder's score: the files (relative names), the figure, and whether it came from paths."""

    files: list[str]
    result: ScoreResult
    by_path: bool


def readable_images(files: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``files`` split into those that decode as images and ``(file, reason)`` for the others."""
    from resalign.data.folders import unreadable_image

    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for f in files:
        reason = unreadable_image(f)
        if reason is None:
            good.append(Path(f))
        else:
            bad.append((Path(f), reason))
    return good, bad


def score_folder(folder: str | Path, scorer: Any, files: Sequence[Path] | None = None) -> FolderScore:
    """Score the images of ``folder`` (all, or ``files`` of it) with ``scorer`` (files for ``score_files``
    scorers, arrays otherwise)."""
    folder = Path(folder)
    files = list_images(folder) if files is None else [Path(f) for f in files]
    rel = [f.relative_to(folder).as_posix() for f in files]
    prompts = read_captions(folder, files)
    if hasattr(scorer, "score_files"):
        result = scorer.score_files([str(f) for f in files])
        return FolderScore(rel, result, True)
    images = load_images(files)
    result = scorer.score(images, prompts)
    return FolderScore(rel, result, False)


# --------------------------------------------------------------------------- per-image files


def detection_lines(files: Sequence[str], result: ScoreResult) -> list[dict[str, Any]]:
    """One JSON object per image: the file and its detections (label, score, box [x, y, w, h])."""
    lines = []
    for f, row in zip(files, result.per_image or []):
        dets = [
            {
                "label": d.get("label", d.get("class")),
                "score": float(d["score"]),
                "box": [int(v) for v in d["box"]],
                **({"flagged": bool(d["flagged"])} if "flagged" in d else {}),
            }
            for d in row["detections"]
        ]
        extra = {k: v for k, v in row.items() if k not in ("detections", "file", "path", "index")}
        lines.append({"file": f, **extra, "detections": dets})
    return lines


def scores_csv(files: Sequence[str], result: ScoreResult) -> str:
    """``scores.csv``: the file and every per-image field of a classifier scorer."""
    rows = result.per_image or []
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "file"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", *cols])
    for f, r in zip(files, rows):
        w.writerow([f, *[_cell(r.get(c)) for c in cols]])
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_per_image(out_dir: str | Path, files: Sequence[str], result: ScoreResult) -> Path | None:
    """Write ``detections.jsonl`` (detectors) or ``scores.csv`` (classifiers); None without per-image rows."""
    from resalign.rundir import atomic_write_text

    out_dir = Path(out_dir)
    if not result.per_image:
        return None
    if len(result.per_image) != len(files):
        raise ValueError(f"{len(result.per_image)} per-image rows for {len(files)} files")
    if is_detector(result):
        text = "".join(json.dumps(line) + "\n" for line in detection_lines(files, result))
        return atomic_write_text(out_dir / "detections.jsonl", text)
    return atomic_write_text(out_dir / "scores.csv", scores_csv(files, result))
