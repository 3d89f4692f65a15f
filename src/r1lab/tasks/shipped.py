"""Loaders of real datasets: the ones shipped in `r1lab/data/` and the generic JSONL/Parquet loader.

Shipped (test splits only; sources and licences in `r1lab/data/NOTICE.md`):
  * `gsm8k`: 1319 grade-school word problems; the reference is the number after `####` in the
    worked answer, thousands commas removed; verifier "gsm8k".
  * `math500`: 500 MATH competition problems; reference = the LaTeX `answer`; verifier "math".
  * `aime2024`: 30 AIME 2024 problems; reference = the integer answer ("025" becomes "25"); "math".
  * `countdown-hf`, `countdown-tinyzero`: 1024 Countdown instances each, prompted like the generator.
Every one of them also reads the same format from `task.path` (e.g. your own copy of GSM8K's
train.jsonl); then any split name is accepted and only labels the ids.

`jsonl` maps the fields of any `.jsonl`/`.parquet` file through options: `question`, `answer`, `id`,
`messages` (a field of chat messages, instead of `question`), `verifier`, `system`. Fields it does
not map are kept in `meta`, so a Countdown file keeps `nums`/`target` and a code file its `tests`.

Each loader yields `Problem`s with ids `<task>/<split>/<row>` (0-based over non-blank rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from r1lab.chat import R1_SYSTEM_PROMPT, r1_messages
from r1lab.tasks.base import Problem, TaskError
from r1lab.tasks.countdown import countdown_problem, countdown_rows
from r1lab.tasks.files import Source, get_field, read_rows, shipped_file, user_file
from r1lab.tasks.options import FileOptions

VERIFIERS = ("math", "gsm8k", "countdown", "exact", "code")

#: task -> its shipped file under r1lab/data/ (all are test splits)
SHIPPED = {
    "gsm8k": "gsm8k/test.jsonl",
    "math500": "math500/test.jsonl",
    "aime2024": "aime2024/test.jsonl",
    "countdown-hf": "countdown/test_hf_rows_10000_11023.jsonl",
    "countdown-tinyzero": "countdown/test_tinyzero_default.jsonl",
}


class ShippedOptions(FileOptions):
    """Options of the shipped loaders: only the common `system` and `shuffle`."""


class JsonlOptions(FileOptions):
    """Field mapping of the generic `jsonl` loader."""

    question: str = Field("question", description="field holding the problem text")
    answer: str = Field("answer", description="field holding the reference answer (string or number)")
    id: str | None = Field(None, description="field holding a unique row id (default: the row number)")
    messages: str | None = Field(
        None, description="field holding chat messages to prompt with, instead of question"
    )
    verifier: Literal["math", "gsm8k", "countdown", "exact", "code"] = Field(
        "math", description="how answers are graded"
    )


def source_for(task: str, path: str | None) -> Source:
    """The user's file if `task.path` is set, else the task's shipped file."""
    return user_file(path) if path is not None else shipped_file(SHIPPED[task])


def _meta(task: str, split: str, verifier: str, **extra) -> dict:
    return {"task": task, "split": split, "verifier": verifier, **extra}


def gsm8k_reference(answer: str, where: str) -> str:
    """The final answer after `####`, commas removed: `"...\\n#### 1,234"` -> `"1234"`."""
    head, sep, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not final:
        raise TaskError(f"{where}: field 'answer': no '#### <final answer>' line")
    return final


def iter_gsm8k(split: str, opts: ShippedOptions, path: str | None) -> Iterator[Problem]:
    for i, (where, row) in enumerate(read_rows(source_for("gsm8k", path))):
        question = get_field(row, "question", str, where)
        answer = get_field(row, "answer", str, where)
        ref = gsm8k_reference(answer, where)
        meta = _meta("gsm8k", split, "gsm8k", solution=answer)
        yield Problem(f"gsm8k/{split}/{i}", r1_messages(question, opts.system), ref, meta)


def iter_math500(split: str, opts: ShippedOptions, path: str | None) -> Iterator[Problem]:
    for i, (where, row) in enumerate(read_rows(source_for("math500", path))):
        problem = get_field(row, "problem", str, where)
        answer = get_field(row, "answer", str, where)
        extra = {k: row[k] for k in ("subject", "level", "unique_id", "solution") if k in row}
        meta = _meta("math500", split, "math", **extra)
        yield Problem(f"math500/{split}/{i}", r1_messages(problem, opts.system), answer, meta)


def iter_aime2024(split: str, opts: ShippedOptions, path: str | None) -> Iterator[Problem]:
    for i, (where, row) in enumerate(read_rows(source_for("aime2024", path))):
        problem = get_field(row, "problem", str, where)
        raw = get_field(row, "answer", (str, int), where)
        text = str(raw).strip()
        # AIME answers are integers 0-999 written with leading zeros ("025"); compare as integers.
        ref = str(int(text)) if text.isdigit() else text
        extra = {k: row[k] for k in ("id", "url", "solution") if k in row}
        meta = _meta("aime2024", split, "math", raw_answer=text, **extra)
        yield Problem(f"aime2024/{split}/{i}", r1_messages(problem, opts.system), ref, meta)


def iter_countdown_file(task: str, split: str, opts: ShippedOptions, path: str | None) -> Iterator[Problem]:
    for i, (_, nums, target, row) in enumerate(countdown_rows(source_for(task, path))):
        extra = {k: row[k] for k in ("hf_row", "split_index") if k in row}
        meta = _meta(task, split, "countdown", **extra)
        yield countdown_problem(nums, target, id=f"{task}/{split}/{i}", system=opts.system, meta=meta)


def _chat_messages(row: dict, field: str, where: str) -> list[dict[str, str]]:
    value = get_field(row, field, list, where)
    msgs = []
    for k, m in enumerate(value):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if not ok or m["role"] not in ("system", "user", "assistant"):
            raise TaskError(
                f"{where}: field '{field}': message {k} must be {{role: system|user|assistant, content: str}}"
            )
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def iter_jsonl(split: str, opts: JsonlOptions, path: str | None) -> Iterator[Problem]:
    if path is None:
        raise TaskError("task 'jsonl': needs task.path (a .jsonl or .parquet file)")
    source = user_file(path)
    mapped = {opts.answer, opts.messages if opts.messages else opts.question}
    seen_ids: dict[str, str] = {}
    for i, (where, row) in enumerate(read_rows(source)):
        ref = get_field(row, opts.answer, (str, int, float), where)
        solution = None
        if opts.messages:
            messages = _chat_messages(row, opts.messages, where)
            if messages and messages[-1]["role"] == "assistant":  # a worked answer, not part of the prompt
                solution = messages.pop()["content"]
            if not any(m["role"] == "user" for m in messages):
                raise TaskError(f"{where}: field '{opts.messages}': no user message")
            if opts.system and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": R1_SYSTEM_PROMPT})
        else:
            messages = r1_messages(get_field(row, opts.question, str, where), opts.system)
        if opts.id:
            pid = str(get_field(row, opts.id, (str, int), where))
            mapped.add(opts.id)
            if pid in seen_ids:
                raise TaskError(
                    f"{where}: field '{opts.id}': duplicate id {pid!r} (first at {seen_ids[pid]})"
                )
            seen_ids[pid] = where
        else:
            pid = f"{Path(path).stem}/{split}/{i}"
        extra = {k: v for k, v in row.items() if k not in mapped}
        if solution is not None:
            extra["solution"] = solution
        meta = {**extra, **_meta("jsonl", split, opts.verifier, source=str(source))}
        yield Problem(pid, messages, str(ref), meta)
