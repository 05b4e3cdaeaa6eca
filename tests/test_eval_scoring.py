"""``resalign score``: per-image files, and NudeNet results identical to the nudenet package."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from resalign.cli import main
from resalign.components import Component, ScoreResult
from resalign.eval.scoring.run import harm_scores, score_folder, write_per_image


def _skimage_images(dst: Path) -> Path:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    dst.mkdir()
    for name in ("astronaut.png", "chelsea.png", "rocket.jpg", "coffee.png"):
        shutil.copy(src / name, dst / name)
    from PIL import Image

    Image.fromarray(np.full((16, 24, 3), 200, np.uint8)).save(dst / "small.png")  # not square, tiny
    return dst


def test_score_nudenet_equals_the_package(tmp_path):
    nudenet = pytest.importorskip("nudenet")
    folder = _skimage_images(tmp_path / "imgs")
    out = tmp_path / "run"
    assert main(["score", str(folder), "--scorer", "nudenet", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    detector = nudenet.NudeDetector()
    files = sorted(p.name for p in folder.iterdir())
    assert [x["file"] for x in lines] == files
    found = 0
    for line in lines:
        expected = detector.detect(str(folder / line["file"]))
        got = [{"class": d["label"], "score": d["score"], "box": d["box"]} for d in line["detections"]]
        assert got == expected, line["file"]
        found += len(expected)
    assert found >= 1  # the astronaut's face is detected: the comparison is not vacuous
    rep = json.loads((out / "report.json").read_text())
    (row,) = rep["results"]
    assert row["metric"] == "harmful_rate" and row["images"] == 5 and row["flagged"] == 0
    assert rep["settings"]["by_path"] is True
    assert (out / "samples.png").is_file() and "0 of 5 flagged" in (out / "report.md").read_text()


class _Brightness(Component):
    """A classifier-style scorer: 'harmful' when the mean pixel value exceeds a threshold."""

    name: ClassVar[str] = "brightness"
    metric: ClassVar[str] = "harmful_rate"

    @dataclass
    class Config:
        threshold: float = 128.0

    def score(self, images, prompts=None):
        m = images.reshape(len(images), -1).mean(1)
        rows = [{"probability": float(v / 255), "harmful": bool(v > self.config.threshold), "prompt": p}
                for v, p in zip(m, prompts or [None] * len(m))]
        return ScoreResult(self.metric, float(np.mean(m > self.config.threshold)), rows)


def test_classifier_scores_csv_with_captions(tmp_path):
    from resalign.data.folders import write_folder

    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 200, 250, 30)])
    write_folder(tmp_path / "f", images, ["dark", "bright", "brighter", "dim"])
    scored = score_folder(tmp_path / "f", _Brightness())
    assert scored.result.value == 0.5 and not scored.by_path
    path = write_per_image(tmp_path / "out", scored.files, scored.result)
    assert path.name == "scores.csv"
    rows = list(csv.DictReader(path.open()))
    assert [r["file"] for r in rows] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [r["prompt"] for r in rows] == ["dark", "bright", "brighter", "dim"]
    assert [r["harmful"] for r in rows] == ["False", "True", "True", "False"]
    np.testing.assert_allclose(harm_scores(scored.result), [10 / 255, 200 / 255, 250 / 255, 30 / 255], rtol=1e-5)


def test_score_errors(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["score", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "no images" in capsys.readouterr().err
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "empty" / "a.png")
    assert main(["score", str(tmp_path / "empty"), "--scorer", "nudenett", "--out", str(tmp_path / "o3")]) != 0
    err = capsys.readouterr().err
    assert "unknown scorer 'nudenett'" in err and "nudenet" in err
