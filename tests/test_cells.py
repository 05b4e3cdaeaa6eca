"""resalign.cells: records, --resume and the split over two gloo ranks, on cells whose results are
known in closed form (i², and a small array per cell)."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch.multiprocessing as mp

from resalign import distributed as D
from resalign.cells import Cell, Outcome, Sweep
from resalign.errors import ConfigError

SETTINGS = {"seeds": 3, "lr": 1e-4, "threads": 1}


def _cells(n: int) -> list[Cell]:
    return [Cell(f"square-{i}", {"i": i}) for i in range(n)]


def _square(cell: Cell, calls: list[int] | None = None) -> Outcome:
    i = cell.settings["i"]
    if calls is not None:
        calls.append(i)
    return Outcome({"square": i * i, "active": D.active()}, {"row": np.full((2, 3), i, dtype=np.uint8)})


def test_finished_cells_are_read_back_on_resume(tmp_path):
    out, calls = tmp_path / "sweep", []
    sweep = Sweep(out, command="attack", settings=SETTINGS)
    first = sweep.run(_cells(3), lambda c: _square(c, calls))
    sweep.close()
    assert calls == [0, 1, 2] and [o.value["square"] for o in first] == [0, 1, 4]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}

    # a crash before cell 2 was recorded: only its record is missing, and only it is computed again
    (key2,) = [p for p in (out / "cells").glob("square-2-*.json")]
    key2.unlink()
    calls.clear()
    resumed = Sweep(out, command="attack", settings={**SETTINGS, "threads": 2}, resume=True)  # threads may change
    again = resumed.run(_cells(3), lambda c: _square(c, calls))
    assert calls == [2] and (resumed.reused, resumed.computed) == (2, 1)
    for name, stamp in stamps.items():
        if not name.startswith(key2.stem) and name != "sweep.json":
            assert (out / "cells" / name).stat().st_mtime_ns == stamp, name
    for a, b in zip(first, again):
        assert a.value == b.value
        np.testing.assert_array_equal(a.arrays["row"], b.arrays["row"])
    record = json.loads((out / "cells" / key2.name).read_text())
    assert record["name"] == "square-2" and record["settings"] == {"i": 2} and record["arrays"] == ["row"]
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in (out / "cells").iterdir())


def test_changed_settings_are_refused_or_get_new_keys(tmp_path):
    out = tmp_path / "sweep"
    sweep = Sweep(out, command="compare", settings=SETTINGS)
    sweep.run(_cells(2), _square)
    sweep.close()
    with pytest.raises(ConfigError, match=r"--resume: setting 'lr' differs .*0\.0001 there, 0\.001 now"):
        Sweep(out, command="compare", settings={**SETTINGS, "lr": 1e-3}, resume=True)
    with pytest.raises(ConfigError, match="holds a 'compare' sweep, not 'attack'"):
        Sweep(out, command="attack", settings=SETTINGS, resume=True)
    with pytest.raises(ConfigError, match="not empty"):
        Sweep(out, command="compare", settings=SETTINGS)
    # a cell whose own settings changed has another key, so its old record is not reused
    resumed = Sweep(out, command="compare", settings=SETTINGS, resume=True)
    changed = Cell("square-1", {"i": 5})
    assert resumed.key(changed) != resumed.key(_cells(2)[1])
    (o,) = resumed.run([changed], _square)
    assert o.value["square"] == 25 and resumed.computed == 1
    # the key does not depend on the run directory, so a sweep's keys are the same in every attempt
    assert Sweep(tmp_path / "other", command="compare", settings=SETTINGS).key(changed) == resumed.key(changed)


def test_resuming_a_folder_without_a_sweep_is_refused_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"holds no sweep \(no cells/sweep.json\), nothing to resume; run compare without"):
        Sweep(empty, command="compare", settings=SETTINGS, resume=True)
    assert not any(empty.iterdir())  # no lock, config or cells written
    with pytest.raises(ConfigError, match="does not exist, nothing to resume"):
        Sweep(tmp_path / "missing", command="attack", settings=SETTINGS, resume=True)
    assert not (tmp_path / "missing").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(r: int, world: int, port: int, out_dir: str, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(r))
    assert D.init("cpu")
    try:
        calls: list[int] = []
        sweep = Sweep(out_dir, command="ablate-components", settings=SETTINGS)
        outcomes = sweep.run(_cells(5), lambda c: _square(c, calls))
        result[r] = {"calls": calls, "values": [o.value for o in outcomes],
                     "rows": [o.arrays["row"].tolist() for o in outcomes], "holds_lock": sweep.run_dir is not None}
    finally:
        D.shutdown()


def test_two_gloo_ranks_split_the_cells_and_gather_them_in_order(tmp_path):
    manager = mp.Manager()
    result = manager.dict()
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(tmp_path / "sweep"), result), nprocs=2,
                       start_method="spawn")
    assert result[0]["calls"] == [0, 2, 4] and result[1]["calls"] == [1, 3]
    single = [_square(c) for c in _cells(5)]
    for r in (0, 1):
        # inside a cell a rank is a single process (solo), and every rank ends with all cells in order
        assert result[r]["values"] == [o.value for o in single]
        assert result[r]["rows"] == [o.arrays["row"].tolist() for o in single]
    assert result[0]["holds_lock"] and not result[1]["holds_lock"]
    assert len(list((tmp_path / "sweep" / "cells").glob("square-*.json"))) == 5


def test_an_interrupted_cell_says_how_to_resume(tmp_path):
    from resalign.errors import RunInterrupted

    def interrupted(cell: Cell) -> Outcome:
        if cell.settings["i"] == 1:
            raise KeyboardInterrupt
        return _square(cell)

    sweep = Sweep(tmp_path / "sweep", command="compare", settings=SETTINGS)
    with pytest.raises(RunInterrupted, match=r"compare interrupted in cell 'square-1'.*--resume --out .*sweep"):
        sweep.run(_cells(3), interrupted)
    assert [p.name.split("-")[1] for p in (tmp_path / "sweep" / "cells").glob("square-*.json")] == ["0"]
