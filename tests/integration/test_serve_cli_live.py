"""`r1lab serve CHECKPOINT` as a user runs it: a subprocess on a free loopback port, a saved tiny
checkpoint, the official openai client, the request log, then a clean Ctrl-C shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from openai import OpenAI

from r1lab.modeling import build_char_tokenizer, build_model, save_checkpoint
from r1lab.serve.background import free_port

pytestmark = pytest.mark.slow


class _PortTaken(Exception):
    """The free port was taken by someone else before the (slow-starting) server could bind it."""


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read()
            if "address already in use" in err.lower():
                raise _PortTaken(err)
            raise AssertionError(f"server exited early: {err}")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("server did not become healthy")


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, dict]:
    """Start `r1lab serve ARGS --port P` on a free port and wait until healthy: (process, url, health).

    free_port() only finds a port that is free *now*; the server binds it seconds later (torch import,
    model load), and on a busy machine another socket can take it in between. Then pick another."""
    for attempt in range(3):
        port = free_port()
        cmd = [sys.executable, "-m", "r1lab.cli", "serve", *args, "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            return proc, url, _wait_healthy(url, proc)
        except _PortTaken:
            if attempt == 2:
                raise
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    raise AssertionError("unreachable")


def test_serve_command_end_to_end(tmp_path):
    tokenizer = build_char_tokenizer()
    ckpt = save_checkpoint(build_model("gpt2-1m", tokenizer, seed=0), tokenizer, tmp_path / "tiny-ckpt")
    log = tmp_path / "requests.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "R1LAB_API_KEY"}
    args = [str(ckpt), "--api-key", "sekret", "--log-requests", str(log), "--threads", "1",
            "--price-per-hour", "0.5"]  # fmt: skip
    proc, url, health = _start(args, env)
    try:
        assert health["status"] == "ok" and health["model"] == "tiny-ckpt"
        client = OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model="tiny-ckpt", messages=[{"role": "user", "content": "2+2?"}], max_tokens=8
        )
        assert r.usage.completion_tokens <= 8 and r.model_extra["x_r1lab"]["price_per_hour_usd"] == 0.5
        chunks = list(
            client.chat.completions.create(
                model="tiny-ckpt", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(records) == 2 and records[0]["messages"][0]["content"] == "2+2?"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "key: required" in err and "sekret" not in err
