"""What ``resalign score`` measures on a folder of existing images: which files can be read, the
flagged share of a rate scorer (mean ± SEM over images, bootstrap interval; :mod:`resalign.eval.reports.stats`)
and the flagged / not flagged sample rows of its grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resalign.components import ScoreResult
from resalign.errors import DataError
from resalign.eval.scoring.run import list_images, readable_images
from resalign.eval.reports.stats import rate_stats


def listing(names: Sequence[str], quote: str = "", n: int = 20) -> str:
    """The first ``n`` names, comma-separated (each between ``quote``), then ``...`` when there are more."""
    return ", ".join(f"{quote}{s}{quote}" for s in names[:n]) + (", ..." if len(names) > n else "")


def screen_images(folder: str | Path, *, strict: bool, warn: Callable[[str], None]) -> tuple[list[Path], list[str]]:
    """The readable image files of ``folder`` and the unreadable ones' relative paths.

    A missing or empty folder fails before any scorer loads its weights. Unreadable files are listed
    through ``warn`` and skipped, or refused with ``strict``; a folder with no readable image fails.
    """
    files = list_images(folder)
    files, bad = readable_images(files)
    root = Path(folder)
    skipped = [f.relative_to(root).as_posix() for f, _ in bad]
    if bad and strict:
        raise DataError(f"--strict-images: {str(bad[0][0])!r} is not a readable image ({bad[0][1]})"
                        + (f"; {len(bad) - 1} more unreadable file(s)" if len(bad) > 1 else ""))
    if not files:
        raise DataError(f"image folder {str(folder)!r}: none of its {len(bad)} image file(s) can be read "
                        f"(first: {skipped[0]!r}: {bad[0][1]})")
    if bad:
        warn(f"skipping {len(bad)} unreadable image file(s) in {str(folder)!r}: "
             + listing(skipped) + " (--strict-images refuses them instead)")
    return files, skipped


def image_side(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return min(im.size)


def flags_of(result: ScoreResult) -> list[bool] | None:
    """Per-image binary outcomes of a rate scorer, when its rows carry them."""
    rows = result.per_image or []
    for key in ("flagged", "harmful", "unsafe", "match"):
        if rows and all(isinstance(r.get(key), bool) for r in rows):
            return [r[key] for r in rows]
    return None


def rate_summary(result: ScoreResult, row: dict[str, Any]) -> tuple[list[bool] | None, str]:
    """A rate scorer's flags, its statistics added to the report ``row``, and the sentence stating them."""
    flags = flags_of(result)
    if flags is None:
        return None, ""
    st = rate_stats(flags)
    row.update(images=st.n, flagged=st.k, image_sem=st.sem, ci95=[st.ci_low, st.ci_high])
    return flags, (f" {st.k} of {st.n} flagged: rate {st.rate:.4f} ± {st.sem:.4f} (SEM over images), "
                   f"95% bootstrap interval [{st.ci_low:.4f}, {st.ci_high:.4f}].")


def grid_rows(folder: Path, files: Sequence[str], flags: Sequence[bool], n: int = 8) -> dict[str, list[np.ndarray]]:
    """Up to ``n`` flagged and ``n`` not flagged images, as thumbnails of at most 128 px."""
    from PIL import Image

    rows: dict[str, list[np.ndarray]] = {"flagged": [], "not flagged": []}
    for f, flagged in zip(files, flags):
        row = rows["flagged" if flagged else "not flagged"]
        if len(row) < n:
            with Image.open(folder / f) as im:
                im = im.convert("RGB")
                im.thumbnail((128, 128))
                row.append(np.asarray(im))
    return {k: v for k, v in rows.items() if v}
