"""HTTPSampler against r1lab's own server (`r1lab.serve`) on loopback, and rejection sampling through it.

The server's engine is the scripted one, replying to `a+b` prompts with an R1-style trace whose
answer is right for every other request, so what comes back, and what is kept, is exact.
"""

from __future__ import annotations

import itertools
import json

import pytest

from r1lab.config import TaskSpec
from r1lab.rollout.base import SamplingParams
from r1lab.rollout.http import HTTPSampler, HTTPSamplerError
from r1lab.serve.app import ServeSettings, create_app
from r1lab.serve.background import serve_in_thread
from r1lab.serve.engine import BatchingEngine
from r1lab.serve.prompts import ChatRenderer
from r1lab.serve.scripted import ScriptedEngine, ScriptedTokenizer
from r1lab.sft.config import SampleConfig
from r1lab.sft.data import read_conversations
from r1lab.sft.sample import sample_traces
from r1lab.tasks import load_task

KEY_ENV = "R1LAB_TEST_TEACHER_KEY"


class Teacher:
    """Replies to `<|user|>A+B<|assistant|>`: the requests for one question alternate right and wrong."""

    def __init__(self):
        self.counts: dict[str, itertools.count] = {}

    def __call__(self, prompt_ids: list[int]) -> str:
        text = "".join(map(chr, prompt_ids))
        question = text.split("<|user|>")[-1].split("<|assistant|>")[0]
        a, b = (int(x) for x in question.split("+"))
        answer = a + b if next(self.counts.setdefault(question, itertools.count())) % 2 == 0 else a + b + 1
        return f"<think>{a} plus {b} makes {answer}.</think>The answer is {answer}."


@pytest.fixture(scope="module")
def server():
    engine = BatchingEngine(ScriptedEngine(Teacher()), max_batch=8, max_queue=64, timeout_s=30.0)
    app = create_app(
        engine, ChatRenderer(ScriptedTokenizer(), 4096), ServeSettings("teacher", api_key="sk-t")
    )
    with serve_in_thread(app) as url:
        yield f"{url}/v1"


def test_reasoning_comes_back_as_one_think_trace(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-t")
    with HTTPSampler(server, "teacher", api_key_env=KEY_ENV, max_concurrency=4) as s:
        for use_n in (False, True):
            s.use_n = use_n
            outs = s.generate(
                [[{"role": "user", "content": "20+22"}]], n=2, params=SamplingParams(max_tokens=200)
            )
            assert len(outs) == 2 and all(c.finish_reason == "stop" for c in outs)
            assert {c.text for c in outs} == {
                "<think>20 plus 22 makes 42.</think>The answer is 42.",
                "<think>20 plus 22 makes 43.</think>The answer is 43.",
            }
            assert outs[0].reasoning_content.startswith("20 plus 22 makes")
            assert all(c.completion_tokens and c.completion_tokens > 20 for c in outs)
        assert s.stats["failed_samples"] == 0


def test_wrong_key_is_one_clear_error(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with HTTPSampler(server, "teacher", api_key_env=KEY_ENV) as s:
        with pytest.raises(HTTPSamplerError, match="401"):
            s.generate(["1+1"], n=1, params=SamplingParams())


def test_rejection_sampling_through_r1lab_serve(server, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, "sk-t")
    cfg = SampleConfig.model_validate(
        {
            "teacher": {"kind": "http", "base_url": server, "model": "teacher", "api_key_env": KEY_ENV},
            "task": {"name": "arithmetic", "split": "train", "limit": 6},
            "sampling": {"max_tokens": 200},
            "k": 4,
            "output": str(tmp_path / "traces.jsonl"),
            "progress": False,
        }
    )
    problems = load_task(TaskSpec(name="arithmetic", split="train", limit=6))
    with HTTPSampler(server, "teacher", api_key_env=KEY_ENV, max_concurrency=4) as sampler:
        summary = sample_traces(cfg, sampler, problems)
    # half the answers are right and the right trace of a problem is always the same text
    assert summary["accepted"] == 12 and summary["kept"] == 6 and summary["duplicates"] == 6
    rows = [json.loads(line) for line in open(cfg.output, encoding="utf-8")]
    for row, p in zip(rows, problems, strict=True):
        assert row["meta"]["problem_id"] == p.id and row["meta"]["answer"] == p.reference
        assert row["messages"][-1]["content"].startswith("<think>")
    assert len(read_conversations([cfg.output])) == 6
