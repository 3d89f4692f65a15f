"""Rejection sampling with a scripted teacher: what is kept, provenance, and resuming without loss or duplicates."""

from __future__ import annotations

import json

import pytest

from r1lab.config import TaskSpec
from r1lab.rollout.base import Completion
from r1lab.sft.config import SampleConfig
from r1lab.sft.data import read_conversations
from r1lab.sft.sample import normalise, progress_path, repair_tail, sample_traces
from r1lab.tasks import load_task

PROBLEMS = load_task(TaskSpec(name="arithmetic", split="train", limit=10))


class ScriptedTeacher:
    """Sample j of a problem: 0 and 2 the same right trace, 1 another right one, 3 wrong, 4 right but cut
    off, 5 right but without <think>, 6 never delivered (when `fail` names the problem)."""

    def __init__(self, interrupt_after: int | None = None, fail: set[str] = frozenset()):
        self.calls = 0
        self.interrupt_after = interrupt_after
        self.fail = fail

    def text(self, question: str, ref: str, j: int) -> tuple[str, str]:
        variants = [
            (f"<think>{question} = {ref}</think> {ref}", "stop"),
            (f"<think>{question}, carry... {ref}</think>\n{ref}", "stop"),
            (f"<think>{question}  =  {ref}</think>  {ref}", "stop"),  # sample 0 up to whitespace
            (f"<think>{question} = 1</think> 1", "stop"),
            (f"<think>{question} = {ref}</think> {ref}!", "length"),
            (f"{ref}", "stop"),
            ("", "error"),
        ]
        return variants[j]

    def generate(self, prompts, n, params):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        out = []
        for i, msgs in enumerate(prompts):
            problem = next(p for p in PROBLEMS if p.messages == msgs)
            for j in range(n):
                text, finish = self.text(problem.question, problem.reference, j)
                if finish == "error" and problem.id not in self.fail:
                    text, finish = self.text(problem.question, problem.reference, 0)
                out.append(Completion(i, text, [7] * len(text), [], finish))  # type: ignore[arg-type]
        return out


def config(tmp_path, **kw) -> SampleConfig:
    fields = {
        "teacher": {"kind": "http", "base_url": "http://x/v1", "model": "t"},
        "k": 7,
        "output": str(tmp_path / "traces.jsonl"),
        "problems_per_call": 3,
        "progress": False,
        **kw,
    }
    return SampleConfig.model_validate(fields)


def kept(path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [(r["meta"]["problem_id"], normalise(r["messages"][-1]["content"])) for r in rows]


def test_only_new_verified_well_formed_traces_are_kept_with_provenance(tmp_path):
    cfg = config(tmp_path)
    summary = sample_traces(cfg, ScriptedTeacher(), PROBLEMS)
    # per problem: 0, 1, 2 and 6 accepted; 2 and 6 repeat 0
    assert summary["total"] == 70 and summary["kept"] == 20 and summary["duplicates"] == 20
    assert summary["accepted"] == 40 and summary["failed"] == 0
    assert summary["acceptance_rate"] == pytest.approx(40 / 70)
    rows = [json.loads(line) for line in open(cfg.output, encoding="utf-8")]
    first = rows[0]
    assert first["messages"][:-1] == PROBLEMS[0].messages
    assert first["meta"]["problem_id"] == PROBLEMS[0].id and first["meta"]["sample_index"] == 0
    assert first["meta"]["teacher"] == "http:http://x/v1#t" and first["meta"]["parts"]["accuracy"] == 1.0
    assert first["meta"]["tokens"] == len(first["messages"][-1]["content"])
    assert rows[1]["meta"]["sample_index"] == 1
    # the output is what `r1lab sft` reads
    assert len(read_conversations([cfg.output])) == 20


def test_format_and_cap_options(tmp_path):
    loose = sample_traces(config(tmp_path / "a", require_format=False), ScriptedTeacher(), PROBLEMS)
    assert loose["kept"] == 30  # the bare answer counts when the format is not required
    capped = sample_traces(config(tmp_path / "b", max_keep=1), ScriptedTeacher(), PROBLEMS)
    assert capped["kept"] == 10


def test_interrupted_run_resumes_without_losing_or_duplicating(tmp_path):
    whole = sample_traces(config(tmp_path / "whole"), ScriptedTeacher(), PROBLEMS)
    cfg = config(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        sample_traces(cfg, ScriptedTeacher(interrupt_after=2), PROBLEMS)
    before = kept(cfg.output)
    assert len(before) == 12  # two calls of three problems each
    # a kill in the middle of a write leaves half a line: it is cut off, the record is redone
    with open(cfg.output, "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "tor')
    teacher = ScriptedTeacher()
    summary = sample_traces(cfg, teacher, PROBLEMS)
    assert summary["sampled_problems"] == 4 and teacher.calls == 2
    after = kept(cfg.output)
    assert after[: len(before)] == before
    assert sorted(after) == sorted(kept(whole["output"])) and len(set(after)) == len(after)
    # a third run has nothing left to do
    again = sample_traces(cfg, ScriptedTeacher(), PROBLEMS)
    assert again["sampled_problems"] == 0 and kept(cfg.output) == after


def test_a_problem_with_failed_samples_is_retried_next_run_without_duplicates(tmp_path):
    cfg = config(tmp_path)
    first = sample_traces(cfg, ScriptedTeacher(fail={PROBLEMS[4].id}), PROBLEMS)
    assert first["failed"] == 1 and first["kept"] == 20
    done = [json.loads(line)["problem_id"] for line in open(progress_path(cfg.output))]
    assert PROBLEMS[4].id not in done and len(done) == 9
    second = sample_traces(cfg, ScriptedTeacher(), PROBLEMS)
    assert second["sampled_problems"] == 1 and second["kept"] == 0 and second["duplicates"] == 4
    assert len(kept(cfg.output)) == 20


def test_think_in_prompt_teacher_gets_its_opening_tag_back(tmp_path):
    class R1Distill(ScriptedTeacher):
        def text(self, question, ref, j):
            text, finish = super().text(question, ref, j)
            return text.removeprefix("<think>"), finish

    cfg = config(tmp_path, teacher={"kind": "local", "path": "x", "think_in_prompt": True})
    summary = sample_traces(cfg, R1Distill(), PROBLEMS)
    assert summary["kept"] == 20
    assert all(text.startswith("<think>") for _, text in kept(cfg.output))


def test_repair_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"b":')
    assert repair_tail(p) == 5 and p.read_text() == '{"a": 1}\n'
    assert repair_tail(p) == 0 and repair_tail(tmp_path / "missing") == 0


def test_teacher_config_needs_its_fields():
    from r1lab.config import ConfigError, validate

    with pytest.raises(ConfigError, match="teacher.path"):
        validate(SampleConfig, {"teacher": {"kind": "local"}}, "r.yaml")
    with pytest.raises(ConfigError, match="base_url"):
        validate(SampleConfig, {"teacher": {"kind": "http", "model": "m"}}, "r.yaml")
