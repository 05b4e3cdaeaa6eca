"""``python -m resalign`` is the ``resalign`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "RESALIGN_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "resalign", "score", "--help"], env=env, check=False, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "--quiet" in proc.stdout and "--scorer" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "resalign", "attack", "--adapt", "nope"], env=env, check=False, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "--adapt 'nope': expected one of" in bad.stderr and "lokr" in bad.stderr
