"""`r1lab sft` as a user runs it: killed with SIGKILL after a checkpoint, resumed with --resume, it ends
with exactly the weights of an uninterrupted run; bad input files are one line, exit status 2."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_support import r1lab
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from r1lab.modeling import build_char_tokenizer, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("sft")
    tok = build_char_tokenizer()
    save_checkpoint(build_model("qwen2-4m", tok, seed=0), tok, root / "base")
    rows = []
    for i in range(48):
        a, b = 100 + 37 * i, 55 + 11 * i
        msgs = [
            {"role": "user", "content": f"{a}+{b}"},
            {"role": "assistant", "content": f"<think>{a}+{b}={a + b}</think>{a + b}"},
        ]
        rows.append(json.dumps({"messages": msgs}) + "\n")
    (root / "traces.jsonl").write_text("".join(rows))
    return root


def recipe(root: Path, run_dir: str, **kw) -> Path:
    fields = {
        "stage": "sft",
        "model": str(root / "base"),
        "data": [str(root / "traces.jsonl")],
        "run_dir": str(root / run_dir),
        "threads": 1,
        "epochs": 3,
        "batch_size": 6,
        "batching": "pack",
        "micro_batch_tokens": 128,
        "max_seq_len": 64,
        "lr": 0.002,
        "warmup_steps": 3,
        "save_every": 2,
        "progress": False,
        **kw,
    }
    path = root / f"{run_dir}.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_sigkill_then_resume_equals_uninterrupted(setup):
    root = setup
    whole = r1lab("sft", str(recipe(root, "whole")), cwd=root)
    log, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, log
    assert "model: " in log and "tok/s" in log

    cut_recipe = recipe(root, "cut")
    proc = r1lab("sft", str(cut_recipe), cwd=root)
    latest = root / "cut" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() not in ("", "step_2")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "cut" / "model").exists()

    resumed = r1lab("sft", str(cut_recipe), "--resume", cwd=root)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    a, b = weights(root / "whole"), weights(root / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (root / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # 48 / 6 x 3 epochs, each step logged once


def test_bad_traces_file_is_one_line_with_file_line_field(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}\n')
    proc = r1lab("sft", str(recipe(setup, "bad", data=[str(bad)])), cwd=tmp_path)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert log.strip().splitlines()[-1] == (
        f"r1lab sft: error: {bad}:1: field 'messages[1].content': expected a string, got int"
    )
