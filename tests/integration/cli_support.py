"""`r1lab` as a user runs it: a subprocess of this interpreter with the source tree on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def r1lab(*args: str, cwd: Path) -> subprocess.Popen:
    """Start `r1lab ARGS` in `cwd`, stdout and stderr together in one text pipe."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "r1lab.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
