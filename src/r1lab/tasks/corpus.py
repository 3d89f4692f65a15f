"""The synthetic pretraining corpus for the built-in arithmetic task: a base model with habits.

R1-Zero starts from a base model that already has several behaviours and lets RL choose among them
by reward. A tiny model trained from scratch needs the same: this corpus gives it three ways to
answer an addition `a+b`, all ending with the final answer after `</think>`:

  direct   `<think></think>7998`                       no working at all
  working  `<think>1+7+0=08 ... </think>7998`           column working, lowest digit first, the
                                                        carry written as the third term, each
                                                        sum as two digits (fixed-width lines)
  check    `<think>{working}wait, let me check:\n1+7+0=>08 ...</think>7998`
                                                        the working, then a careful pass over the
                                                        same columns, each sum written after `=>`

Real text is not error-free and neither is this corpus: a `slip_rate` share of plain working passes
contain one slipped column (a sum off by one, the carries that follow it consistent with the slip),
and a slipped pass ends in the wrong answer. A check follows a slip: the first pass of a check has
slipped (`check_slip_rate`, 1.0 by default), and its careful second pass, which gives the final
answer, never slips. So the check genuinely catches and fixes mistakes, and a model that re-verifies
is right more often. That is what gives reflection a reason to grow under RL (the "aha moment").

Two details decide whether the *model* learns that, not only the corpus (measured with the base
model sampling 200 held-out problems x 4 at temperature 1; per-line error = a written sum that is
not the sum of the digits on its line):

  careful pass                         first pass slips   careful-line error   working / check right
  same format as the working           40%                  (copies 59%)       50% / 46%
  `> ` at the start of careful lines   40%                  17.3%              61% / 55%  (1200 steps)
  `=>` before careful sums             100% (this one)       4.1%              53% / 84%  (1000 steps)

With first passes that slip as often as plain working, the cheapest way for a small model to write
the careful pass is to copy the first pass's sums, slips included: right 87% of the time per line
in the corpus, no worse than computing as far as the loss can tell early on. When every checked
first pass has slipped, copying is wrong at the slipped column (and the carries after it), so the
model learns to recompute, and `=>` (the token right before each careful sum) tells it that this
sum never slips. A third design that replaced the working by place-value mental arithmetic left the
model unable to do either in 800 steps (1% right).

Only train-split problems go in: `build_arithmetic_corpus` checks every problem against the
held-out bucket and refuses test problems.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from r1lab.tasks.arithmetic import is_test_arithmetic
from r1lab.tasks.base import Problem, TaskError

CHECK_PHRASE = "wait, let me check:"
CAREFUL_EQUALS = "=>"


@dataclass(frozen=True)
class CorpusMix:
    """Shares of the three behaviours in the corpus, and how often a working pass slips."""

    direct: float = 0.5
    working: float = 0.35
    check: float = 0.15
    slip_rate: float = 0.4
    check_slip_rate: float = 1.0  # a check's first pass: a check follows a slip

    def choose(self, rng: random.Random) -> str:
        x = rng.random() * (self.direct + self.working + self.check)
        if x < self.direct:
            return "direct"
        return "working" if x < self.direct + self.working else "check"


def column_working(
    a: int, b: int, slip_column: int | None = None, slip: int = 0, equals: str = "="
) -> tuple[str, int]:
    """Column addition, lowest digit first, one line per column: `a_i+b_i+carry=s`.

    With `slip_column`, that column's sum is off by `slip` and everything after follows from it.
    `equals` separates the terms from the sum (the careful pass of a check uses `CAREFUL_EQUALS`).

    >>> column_working(4821, 3177)
    ('1+7+0=08\\n2+7+0=09\\n8+1+0=09\\n4+3+0=07\\n', 7998)
    >>> column_working(95, 17)
    ('5+7+0=12\\n9+1+1=11\\n', 112)
    >>> column_working(95, 17, slip_column=0, slip=-1)[1]
    111
    """
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    carry, digits, lines = 0, [], []
    for i in range(width):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        if i == slip_column:
            s = s + slip if 0 <= s + slip <= 19 else s - slip  # a slip always changes the sum
        lines.append(
            f"{x}+{y}+{carry}{equals}{s:02d}\n"
        )  # fixed width: each column's line at a fixed position
        digits.append(s % 10)
        carry = s // 10
    if carry:
        digits.append(carry)
    result = int("".join(str(d) for d in reversed(digits)))
    return "".join(lines), result


def _working_pass(a: int, b: int, slip_rate: float, rng: random.Random) -> tuple[str, int]:
    if rng.random() < slip_rate:
        width = max(len(str(a)), len(str(b)))
        return column_working(a, b, slip_column=rng.randrange(width), slip=rng.choice((-1, 1)))
    return column_working(a, b)


def addition_completion(
    a: int, b: int, style: str, rng: random.Random, slip_rate: float, check_slip_rate: float | None = None
) -> str:
    """One completion of `a+b` in the given style (see the module docstring).

    >>> addition_completion(12, 30, "direct", random.Random(0), 0.0)
    '<think></think>42'
    >>> print(addition_completion(12, 30, "check", random.Random(0), 0.0))
    <think>2+0+0=02
    1+3+0=04
    wait, let me check:
    2+0+0=>02
    1+3+0=>04
    </think>42
    """
    if style == "direct":
        return f"<think></think>{a + b}"
    if style == "working":
        lines, result = _working_pass(a, b, slip_rate, rng)
        return f"<think>{lines}</think>{result}"
    if style == "check":
        first_rate = slip_rate if check_slip_rate is None else check_slip_rate
        first, _ = _working_pass(a, b, first_rate, rng)
        careful, result = column_working(a, b, equals=CAREFUL_EQUALS)
        return f"<think>{first}{CHECK_PHRASE}\n{careful}</think>{result}"
    raise ValueError(f"unknown style {style!r}")


def parse_addition(problem: Problem) -> tuple[int, int]:
    """Operands of an arithmetic problem whose question is `a+b`."""
    text = problem.question.strip().rstrip("=").strip()
    left, plus, right = text.partition("+")
    if not plus or not left.strip().isdigit() or not right.strip().isdigit():
        raise TaskError(f"problem {problem.id}: the corpus supports additions 'a+b' only, got {text!r}")
    return int(left), int(right)


def build_arithmetic_corpus(problems: list[Problem], mix: CorpusMix, seed: int) -> list[tuple[Problem, str]]:
    """(problem, completion) pairs for pretraining; refuses held-out problems."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        a, b = parse_addition(p)
        if is_test_arithmetic(a, b, "+"):
            raise TaskError(
                f"problem {p.id} ({a}+{b}) is a held-out test problem; the corpus uses train problems only"
            )
        out.append((p, addition_completion(a, b, mix.choose(rng), rng, mix.slip_rate, mix.check_slip_rate)))
    return out
