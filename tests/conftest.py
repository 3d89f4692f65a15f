"""Fixtures shared by every test: the repository root, the `r1lab` entry point, and an in-process CLI
runner that returns (exit status, stdout, stderr) whether the command returns or raises SystemExit.

Keep this file small and generic; a fixture used by one test file belongs in that file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where `recipes/`, `src/` and `pyproject.toml` live)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def r1lab_exe() -> Path:
    """The installed `r1lab` console script of the interpreter running the tests."""
    exe = Path(sys.executable).with_name("r1lab")
    if not exe.exists():
        pytest.skip(f"no r1lab entry point beside {sys.executable} (run `pip install -e .`)")
    return exe


@pytest.fixture
def run_cli(capsys) -> Callable[[list[str]], tuple[int, str, str]]:
    """`run_cli(["grpo", "x.yaml"])` -> (status, stdout, stderr) of `r1lab.cli.main`, in process.

    argparse ends `--help` and bad arguments with SystemExit; the runner turns that into a status so
    tests compare one number whichever way the command ended.
    """
    from r1lab.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before this call
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return status, out, err

    return run
