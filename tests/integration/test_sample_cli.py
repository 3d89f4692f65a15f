"""`r1lab sample` and `r1lab distill` as a user runs them, against an HTTP teacher on loopback.

The teacher answers `A+B` questions; the requests for one question cycle through two right traces
and one wrong one, so whatever the interleaving, every problem ends with exactly those two traces
kept. That makes "killed with SIGKILL mid-way, then re-run" comparable with an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from cli_support import r1lab
from loopback_openai import FakeOpenAI

pytestmark = pytest.mark.slow


def teacher_reply(question: str, count: int) -> str:
    a, b = (int(x) for x in question.split("+"))
    variant = count % 3
    if variant == 0:
        return f"<think>{a}+{b}: add the columns, {a + b}</think>{a + b}"
    if variant == 1:
        return f"<think>{b}+{a} is the same sum: {a + b}</think>\n{a + b}"
    return f"<think>{a}+{b} is about {a + b + 10}</think>{a + b + 10}"


def teacher_behaviour(delay: float = 0.02):
    """What the loopback teacher answers: the question's next reply in its cycle, DeepSeek-style
    (`reasoning_content` split from `content`), after `delay` seconds."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def behave(body: dict, _call: int) -> tuple:
        question = body["messages"][-1]["content"]
        with lock:
            count = counts.get(question, 0)
            counts[question] = count + 1
        time.sleep(delay)
        reasoning, content = teacher_reply(question, count)[len("<think>") :].split("</think>")
        msg = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        return ("json", 200, {"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})

    return behave


@pytest.fixture
def teacher():
    t = FakeOpenAI(teacher_behaviour())
    yield t
    t.close()


def sample_recipe(tmp_path: Path, url: str, output: str, problems: int = 24) -> Path:
    recipe = {
        "stage": "sample",
        "teacher": {
            "kind": "http",
            "base_url": url,
            "model": "teacher",
            "max_concurrency": 2,
            "max_retries": 1,
        },
        "task": {"name": "arithmetic", "split": "train", "limit": problems, "seed": 4},
        "sampling": {"max_tokens": 200},
        "k": 3,
        "output": output,
        "problems_per_call": 2,
    }
    path = tmp_path / f"{Path(output).stem}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def kept(path: Path) -> list[tuple[str, str]]:
    """(problem id, trace) of each complete line; a line torn by a kill (no newline yet) is left out."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]
    return [(r["meta"]["problem_id"], r["messages"][-1]["content"]) for r in rows]


def test_sample_killed_midway_then_rerun_loses_and_repeats_nothing(teacher, tmp_path):
    out = tmp_path / "cut" / "traces.jsonl"
    recipe = sample_recipe(tmp_path, teacher.base_url, str(out))
    proc = r1lab("sample", str(recipe), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= 6):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no traces within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = kept(out)
    assert 0 < len(before) < 48, "the kill should land mid-way"

    rerun = r1lab("sample", str(recipe), cwd=tmp_path)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log
    assert "resuming" in log and "acceptance" in log
    after = kept(out)
    assert after[: len(before)] == before  # nothing kept before the kill was lost or rewritten
    assert len(set(after)) == len(after)  # and nothing is there twice

    whole = tmp_path / "whole" / "traces.jsonl"
    done = r1lab("sample", str(sample_recipe(tmp_path, teacher.base_url, str(whole))), cwd=tmp_path)
    log, _ = done.communicate(timeout=600)
    assert done.returncode == 0, log
    assert sorted(after) == sorted(kept(whole)) and len(after) == 48  # 24 problems x 2 right traces


def test_distill_samples_then_trains_a_student_that_loads(teacher, tmp_path):
    from r1lab.modeling import build_char_tokenizer, build_model, load_model, save_checkpoint

    tok = build_char_tokenizer()
    save_checkpoint(build_model("gpt2-1m", tok, seed=0), tok, tmp_path / "student")
    recipe = yaml.safe_load(
        sample_recipe(tmp_path, teacher.base_url, "traces.jsonl", problems=16).read_text()
    )
    recipe = {
        "stage": "distill",
        "sample": {k: v for k, v in recipe.items() if k != "stage"},
        "sft": {
            "model": str(tmp_path / "student"),
            "run_dir": "sft",
            "epochs": 6,
            "batch_size": 8,
            "lr": 0.003,
        },
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(recipe))
    proc = r1lab("distill", "distill.yaml", "sft.threads=1", "sft.progress=false", cwd=tmp_path)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert len(kept(tmp_path / "traces.jsonl")) == 32
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    model, _ = load_model(tmp_path / "sft" / "model")
    assert f"model: {tmp_path / 'sft' / 'model'}" in log or "model: sft/model" in log
    assert model is not None
