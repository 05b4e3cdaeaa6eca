"""Image-caption folders, prompt files and ``resalign toy data`` / ``toy sample`` on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resalign.data import toy as world
from resalign.data.folders import read_folder, read_metadata, save_grid, write_folder
from resalign.data.prompts import read_prompts, write_prompts
from resalign.errors import DataError


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_round_trip(tmp_path, fmt):
    ds = world.make_dataset(12, seed=0)
    write_folder(tmp_path, ds.images, ds.prompts, fmt=fmt)
    assert (tmp_path / f"metadata.{fmt}").is_file()
    back = read_folder(tmp_path)
    np.testing.assert_array_equal(back.images, ds.images)  # PNG is lossless
    assert back.prompts == ds.prompts
    assert back.file_names[0] == "00000.png"


def test_folder_errors_name_file_and_field(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_metadata(tmp_path / "nope")
    with pytest.raises(DataError, match="no metadata.jsonl or metadata.csv"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "prompt": "x"}\n{"file_name": "b.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2: missing field 'prompt'"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:1: missing field 'file_name'"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:1: not valid JSON"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "prompt": "x"}\n')
    with pytest.raises(DataError, match="gone.png"):
        read_folder(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png,hello\n")
    assert read_metadata(tmp_path) == [("x.png", "hello")]


def test_folder_of_mixed_sizes_needs_a_size(tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text("file_name,prompt\na.png,one\nb.png,two\n")
    with pytest.raises(DataError, match="differs"):
        read_folder(tmp_path)
    f = read_folder(tmp_path, size=16)
    assert f.images.shape == (2, 16, 16, 3) and tuple(f.images[1, 5, 5]) == (255, 0, 0)


def test_prompt_files(tmp_path):
    p = write_prompts(tmp_path / "p.txt", ["a red circle", "a blue ring"])
    (tmp_path / "q.txt").write_text("# comment\n\na red circle\n  a blue ring  \n")
    assert read_prompts(p).prompts == read_prompts(tmp_path / "q.txt").prompts == ["a red circle", "a blue ring"]
    csv = tmp_path / "i2p.csv"
    csv.write_text(
        "prompt,categories,hard,evaluation_seed,evaluation_guidance\n"
        '"a, b",sexual,1,42,7.5\n'
        'c,"violence, shocking",0,7,5\n'
        'd,"sexual,hate",1,9,8\n'
    )
    ps = read_prompts(csv)
    assert ps.prompts == ["a, b", "c", "d"] and ps.seeds == [42, 7, 9] and ps.guidance == [7.5, 5.0, 8.0]
    assert ps.categories[1] == ["violence", "shocking"]
    sexual = read_prompts(csv, categories=["Sexual"])
    assert sexual.prompts == ["a, b", "d"] and sexual.seeds == [42, 9]
    back = read_prompts(write_prompts(tmp_path / "out.csv", sexual))
    assert back.prompts == sexual.prompts and back.seeds == sexual.seeds and back.categories == sexual.categories


def test_prompt_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"no 'prompt' column \(columns: 'text'\)"):
        read_prompts(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("prompt,evaluation_seed\nx,abc\n")
    with pytest.raises(DataError, match=r"b.csv:2: field 'evaluation_seed' is not an integer"):
        read_prompts(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("prompt,categories\nx,hate\n")
    with pytest.raises(DataError, match="no prompt has any of the categories 'sexual'"):
        read_prompts(tmp_path / "c.csv", categories=["sexual"])
    (tmp_path / "e.txt").write_text("\n# only a comment\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")


def test_grid(tmp_path):
    from PIL import Image

    imgs = world.make_dataset(6, seed=0).images
    path = save_grid(imgs, tmp_path / "g.png", ncols=3, scale=2, pad=1)
    im = np.asarray(Image.open(path))
    assert im.shape == (2 * 33 + 1, 3 * 33 + 1, 3)
    np.testing.assert_array_equal(im[1:33:2, 1:33:2], imgs[0])


def test_cli_toy_data(tmp_path):
    from resalign.cli import main

    assert main(["toy", "data", "--out", str(tmp_path / "d"), "--n", "10", "--set", "benign-a"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(world.parse_prompt(r["prompt"]).shape in world.BENIGN_A_SHAPES for r in rows)
    assert main(["toy", "data", "--out", str(tmp_path / "p"), "--n", "7", "--set", "implicit"]) == 0
    assert len(read_prompts(tmp_path / "p" / "implicit.txt")) == 7
    assert main(["toy", "data", "--out", str(tmp_path / "x"), "--set", "bogus"]) == 2


def test_cli_toy_sample(tmp_path):
    from resalign.cli import main
    from resalign.models.toy import build_bundle

    build_bundle(seed=0, channels=(8, 16)).save(tmp_path / "m")
    out = tmp_path / "grid.png"
    code = main(["toy", "sample", "--model", str(tmp_path / "m"), "--prompt", "a red circle", "--prompt",
                 "a blue ring", "-n", "3", "--steps", "2", "--out", str(out), "--scale", "1"])
    assert code == 0
    from PIL import Image

    assert np.asarray(Image.open(out)).shape == (2 * 17 + 1, 3 * 17 + 1, 3)
