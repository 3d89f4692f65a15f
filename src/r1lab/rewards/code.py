r"""Code reward: run the program a completion wrote against the problem's tests, inside the sandbox.

The program is the last ```python fenced block of the answer text (what follows `</think>`, see
`r1lab.chat.split_think`), else the last fenced block of any language; code inside the reasoning
does not count, and an unclosed fence (a truncated completion) is not a program.

`problem.meta["tests"]` is a list of tests, each one of:
  * `{"input": str, "output": str}`: the program reads `input` on stdin; it passes if it exits 0 and
    its stdout equals `output` line by line, each line stripped, trailing blank lines ignored;
  * `{"assert": "assert f(2) == 4"}` (optionally with an `input` for stdin): the statement is
    appended to the program, which passes if it exits 0.
Every test runs in its own fresh sandboxed process (`r1lab.rewards.sandbox.run_python`), so no test
can see another's state and a verdict never depends on anything the program prints about itself.
A test that times out ends the grading: a program that hangs on one input almost always hangs on
the rest, and waiting `wall_s` for each would stall RL; the untried tests count as failed.

The reward: `score` = `pass_rate`, the fraction of tests passed (0 with no program); parts
`accuracy` (1.0 only if every test passes), `pass_rate`, and `format` (1.0 if the completion has
a well-formed think block). `answer` is the extracted program.

    >>> from r1lab.tasks.base import Problem
    >>> p = Problem("sq", [], "", {"verifier": "code", "tests": [{"input": "3\n", "output": "9"}]})
    >>> code_reward("<think>square it</think>\n```python\nprint(int(input()) ** 2)\n```", p).parts
    {'accuracy': 1.0, 'pass_rate': 1.0, 'format': 1.0}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from r1lab import chat
from r1lab.rewards.base import Reward
from r1lab.rewards.sandbox import Limits, run_python
from r1lab.tasks.base import Problem, TaskError

_PYTHON_TAGS = ("python", "python3", "py")
_FENCE = "```"


@dataclass(frozen=True)
class CodeTest:
    """One test of a code problem: stdin, and either expected stdout or an assert statement."""

    stdin: str
    output: str | None  # expected stdout (compared line by line); None for assert tests
    assertion: str | None  # appended to the program; None for stdin/stdout tests


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    r"""Closed ``` blocks of `text` as (language, body), in order; one linear scan.

    >>> fenced_blocks("a\n```python\nx = 1\n```\n```\ny\n```\n```py\nunclosed")
    [('python', 'x = 1'), ('', 'y')]
    """
    blocks: list[tuple[str, str]] = []
    i = 0
    while True:
        start = text.find(_FENCE, i)
        if start < 0:
            return blocks
        eol = text.find("\n", start)
        if eol < 0:
            return blocks
        info = text[start + len(_FENCE) : eol].split()
        end = text.find("\n" + _FENCE, eol)  # the closing fence starts a line
        if end < 0:
            return blocks
        blocks.append((info[0].lower() if info else "", text[eol + 1 : end]))
        i = end + 1 + len(_FENCE)


def extract_program(text: str, think_in_prompt: bool = False) -> str | None:
    r"""The program in a completion's answer text: last python block, else last block; None if none.

    >>> extract_program("<think>```python\nprint(0)\n```</think>\n```python\nprint(1)\n```\n```text\nout\n```")
    'print(1)'
    >>> extract_program("<think>```python\nprint(0)\n```</think> no code") is None
    True
    """
    _, answer_text, _ = chat.split_think(text, think_in_prompt)
    blocks = fenced_blocks(answer_text)
    python = [body for lang, body in blocks if lang in _PYTHON_TAGS]
    candidates = python or [body for _, body in blocks]
    if not candidates or not candidates[-1].strip():
        return None
    return candidates[-1]


def parse_tests(problem: Problem) -> list[CodeTest]:
    """`problem.meta["tests"]` as `CodeTest`s; a malformed entry raises `TaskError` naming it."""
    raw: Any = problem.meta.get("tests")
    where = f"problem {problem.id!r}: meta.tests"
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"{where}: expected a non-empty list of tests, got {type(raw).__name__}")
    tests = []
    for i, t in enumerate(raw):
        ok_keys = isinstance(t, dict) and set(t) <= {"input", "output", "assert"}
        kinds_ok = ok_keys and (("assert" in t) != ("output" in t))
        if not kinds_ok or not all(isinstance(v, str) for v in t.values()):
            raise TaskError(
                f"{where}[{i}]: expected {{'input': str, 'output': str}} or {{'assert': str}}, got {t!r:.120}"
            )
        tests.append(CodeTest(stdin=t.get("input", ""), output=t.get("output"), assertion=t.get("assert")))
    return tests


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def run_test(program: str, test: CodeTest, limits: Limits) -> tuple[bool, str]:
    """Run one test in a fresh sandbox; (passed, the sandbox status)."""
    source = program if test.assertion is None else f"{program}\n\n{test.assertion}\n"
    if test.output is not None:  # room for the expected output however long it is
        limits = dataclasses.replace(
            limits, output_bytes=max(limits.output_bytes, 2 * len(test.output) + 4096)
        )
    result = run_python(source, stdin=test.stdin, limits=limits)
    passed = result.status == "ok" and (test.output is None or _lines(result.stdout) == _lines(test.output))
    return passed, result.status


def code_reward(
    text: str, problem: Problem, limits: Limits | None = None, think_in_prompt: bool = False
) -> Reward:
    """Score a completion by the fraction of `problem.meta["tests"]` its program passes (see module doc)."""
    tests = parse_tests(problem)
    _, _, well_formed = chat.split_think(text, think_in_prompt)
    program = extract_program(text, think_in_prompt)
    passed = 0
    if program is not None:
        for test in tests:
            ok, status = run_test(program, test, limits or Limits())
            passed += ok
            if status == "timeout":
                break
    pass_rate = passed / len(tests)
    parts = {"accuracy": float(passed == len(tests)), "pass_rate": pass_rate, "format": float(well_formed)}
    return Reward(score=pass_rate, parts=parts, answer=program)
