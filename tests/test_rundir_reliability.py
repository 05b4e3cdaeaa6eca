"""Run directories: file modes follow the umask, and one writer at a time (a lock released on exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resalign.errors import ConfigError, RunDirLocked
from resalign.rundir import LOCK_FILE, RunDir, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        rd = RunDir(tmp_path / "run", command="test")
        written = [
            rd.write_text("report.md", "# r\n"),
            rd.write_json("report.json", {"a": 1}),
            rd.write_config({"seed": 0}),
            atomic_write_bytes(rd.path / "checkpoints" / "x.bin", b"\0" * 8),
        ]
        rd.append_metrics({"step": 1})
        written.append(rd.path / "metrics.jsonl")
        rd.write_text("report.md", "# again\n")  # replacing keeps the mode
    finally:
        os.umask(old)
    for path in written:
        assert _mode(path) == expected, path
    assert not [p for p in rd.path.rglob("*.tmp")]


_HOLDER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background parent may have ignored it
    from resalign.rundir import RunDir
    rd = RunDir(sys.argv[1], command="holder")
    print("locked", flush=True)
    time.sleep(60)
""")


def _start_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_in_another_process_is_refused(tmp_path):
    out = tmp_path / "run"
    proc = _start_holder(out)
    try:
        with pytest.raises(RunDirLocked) as info:
            RunDir(out, command="second", resume=True)
        assert str(info.value) == f"--out {out} is in use by another resalign process (pid {proc.pid})"
        assert isinstance(info.value, ConfigError)
        with pytest.raises(RunDirLocked, match=f"pid {proc.pid}"):
            RunDir(out, command="second")  # refused as in use, not as "not empty"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    rd = RunDir(out, command="after", resume=True)  # released when the holder ended (Ctrl-C)
    assert (rd.path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_the_cli_reports_a_busy_run_dir_on_one_line(tmp_path):
    import numpy as np

    from resalign.data.folders import write_folder

    images = write_folder(tmp_path / "images", np.zeros((2, 32, 32, 3), np.uint8), ["a", "b"])
    out = tmp_path / "run"
    proc = _start_holder(out)
    try:
        started = time.perf_counter()
        cli = "import sys; from resalign.cli import main; sys.exit(main())"
        res = subprocess.run([sys.executable, "-c", cli, "score", str(images), "--scorer", "toy-harm", "--out", str(out)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert time.perf_counter() - started < 30
    finally:
        proc.kill()  # SIGKILL: the kernel drops the lock too
        proc.wait(timeout=30)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: --out {out} is in use by another resalign process (pid {proc.pid})"], res.stderr
    RunDir(out, command="after-kill", resume=True)


def test_a_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # left by a process that died
    rd = RunDir(out, command="fresh")  # the lock file alone does not make the folder "not empty"
    assert rd.path == out


def test_the_lock_is_shared_within_a_process_and_released_on_close(tmp_path):
    out = tmp_path / "run"
    first = RunDir(out, command="a")
    second = RunDir(out, command="b", resume=True)  # same process: no self-deadlock
    first.close()
    second.close()
    code = f"from resalign.rundir import RunDir; RunDir({str(out)!r}, command='c', resume=True); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.stdout.strip() == "ok", res.stderr
    with RunDir(out, command="d", resume=True):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert "is in use by another resalign process" in res.stderr
