"""`r1lab serve` command line: clear one-line failures, and the default checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from r1lab.cli import main
from r1lab.serve import commands


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["serve", *argv])
    return code, capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_fails_in_one_clear_line(tmp_path, capsys):
    code, err = _run(capsys, str(tmp_path), "--engine", "vllm")
    assert code == 2
    assert "vLLM is not available" in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    code, err = _run(capsys, str(tmp_path / "nope"))
    assert code == 2 and "no such checkpoint directory" in err
    code, err = _run(capsys, str(tmp_path), "--max-batch", "0")
    assert code == 2 and "--max-batch" in err
    code, err = _run(capsys, str(tmp_path), "--log-requests", str(tmp_path / "missing" / "log.jsonl"))
    assert code == 2 and "does not exist" in err


def test_no_checkpoint_serves_the_quickstart_model(monkeypatch, tmp_path):
    quickstart = pytest.importorskip("r1lab.quickstart")
    monkeypatch.setattr(quickstart, "default_checkpoint", lambda: tmp_path)
    assert commands.resolve_checkpoint(None) == Path(tmp_path)


def test_defaults_are_safe(monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and args.log_requests is None and args.api_key is None
    assert args.threads >= 1
    assert commands._is_loopback("127.0.0.1") and commands._is_loopback("::1")
    assert not commands._is_loopback("0.0.0.0")
