"""Integer arithmetic problems (`4821+3177`) for tiny models: the task a from-scratch base can learn.

Each operand has between `min_digits` and `digits` digits (the digit count is drawn first, so short
and long operands are equally common), the operator is drawn from `ops` ("+", "-", "*"), and for
"-" the larger operand comes first so results stay non-negative (a tiny model need not learn signs).
The user message is the bare expression, `"4821+3177"`, unless `system=True` adds the R1 system
prompt. The reference is the exact result; the verifier is "exact" (integer equality).

The split is by `holdout.in_test_bucket` of the canonical form (operands of + and * sorted, so
`3177+4821` and `4821+3177` are one problem): the train stream skips the bucket, the test set draws
distinct problems from it. When the whole problem space is small (e.g. one-digit sums) the test set is
the entire bucket, shuffled by seed, so it may hold fewer than `limit` problems.

    r1lab tasks show arithmetic --split test --n 3
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterator
from typing import Literal

from pydantic import Field, field_validator, model_validator

from r1lab.chat import r1_messages
from r1lab.tasks.base import Problem, TaskError
from r1lab.tasks.holdout import in_test_bucket
from r1lab.tasks.options import Options

Op = Literal["+", "-", "*"]
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
COMMUTATIVE = frozenset("+*")

#: Problem spaces up to this many canonical problems are enumerated for the test set; larger ones sampled.
ENUMERATE_LIMIT = 50_000
#: Draws in a row that yield nothing new before a stream gives up (never hang on an exhausted space).
MAX_MISSES = 50_000


class ArithmeticOptions(Options):
    """Options of the `arithmetic` generator."""

    digits: int = Field(4, ge=1, le=30, description="most digits per operand")
    min_digits: int | None = Field(None, ge=1, description="fewest digits per operand (default: digits)")
    ops: list[Op] = Field(default_factory=lambda: ["+"], description='operators to draw from: "+", "-", "*"')
    system: bool = Field(
        False, description="prepend the R1 system prompt (off: tiny models see only the expression)"
    )

    @field_validator("ops", mode="before")
    @classmethod
    def _ops_from_string(cls, v):
        # `task.options.ops=+-` on the command line arrives as the string "+-"
        return [c for c in v if not c.isspace() and c != ","] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> ArithmeticOptions:
        if not self.ops:
            raise ValueError("ops is empty; use some of +, -, *")
        if self.min_digits is not None and self.min_digits > self.digits:
            raise ValueError(f"min_digits ({self.min_digits}) is above digits ({self.digits})")
        return self

    @property
    def low_digits(self) -> int:
        return self.digits if self.min_digits is None else self.min_digits


def canonical(a: int, b: int, op: str) -> str:
    """The order-free form the split hashes: `arithmetic:3177+4821` for either order of a sum.

    >>> canonical(4821, 3177, "+") == canonical(3177, 4821, "+")
    True
    """
    if op in COMMUTATIVE and a > b:
        a, b = b, a
    return f"arithmetic:{a}{op}{b}"


def is_test_arithmetic(a: int, b: int, op: str) -> bool:
    """True iff `a op b` (in either order, for + and *) belongs to the test split."""
    return in_test_bucket(canonical(a, b, op))


def arithmetic_problem(a: int, b: int, op: str, *, id: str | None = None, system: bool = False) -> Problem:
    """The problem `a op b` with its exact integer result as the reference.

    >>> p = arithmetic_problem(4821, 3177, "+")
    >>> (p.question, p.reference, p.meta["verifier"])
    ('4821+3177', '7998', 'exact')
    """
    if op not in OPS:
        raise TaskError(f"arithmetic: unknown operator {op!r}; use one of {', '.join(OPS)}")
    expr = f"{a}{op}{b}"
    meta = {"task": "arithmetic", "verifier": "exact", "a": a, "b": b, "op": op}
    return Problem(
        id=id if id is not None else f"arithmetic/{expr}",
        messages=r1_messages(expr, system),
        reference=str(OPS[op](a, b)),
        meta=meta,
    )


def _range(digits: int) -> tuple[int, int]:
    """Smallest and largest integer with exactly `digits` digits (0 counts as one digit)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def _draw(rng: random.Random, opts: ArithmeticOptions) -> tuple[int, int, str]:
    a, b = (rng.randint(*_range(rng.randint(opts.low_digits, opts.digits))) for _ in range(2))
    op = rng.choice(opts.ops)
    if op == "-" and a < b:
        a, b = b, a
    return a, b, op


def _space_size(opts: ArithmeticOptions) -> int:
    count = _range(opts.digits)[1] - _range(opts.low_digits)[0] + 1
    return len(set(opts.ops)) * count * (count + 1) // 2  # unordered pairs: + and * sorted, - ordered a >= b


def _enumerated_test(rng: random.Random, opts: ArithmeticOptions) -> list[tuple[int, int, str]]:
    """Every test-bucket problem of a small space, shuffled; commutative ones shown in a random order."""
    lo, hi = _range(opts.low_digits)[0], _range(opts.digits)[1]
    found = []
    for op in sorted(set(opts.ops)):
        for big in range(lo, hi + 1):
            for small in range(lo, big + 1):
                if in_test_bucket(canonical(big, small, op)):
                    found.append((big, small, op))
    rng.shuffle(found)
    return [(b, a, op) if op in COMMUTATIVE and rng.random() < 0.5 else (a, b, op) for a, b, op in found]


def _sampled(split: str, rng: random.Random, opts: ArithmeticOptions) -> Iterator[tuple[int, int, str]]:
    """Train: every non-test draw (repeats allowed). Test: distinct test-bucket draws."""
    want_test = split == "test"
    seen: set[str] = set()
    misses = 0
    while misses < MAX_MISSES:
        a, b, op = _draw(rng, opts)
        key = canonical(a, b, op)
        if in_test_bucket(key) != want_test or key in seen:
            misses += 1
            continue
        misses = 0
        if want_test:
            seen.add(key)
        yield a, b, op
    if not want_test:
        raise TaskError(
            f"task 'arithmetic': no train problem in {MAX_MISSES} draws; allow more digits or ops"
        )


def iter_arithmetic(split: str, seed: int, opts: ArithmeticOptions) -> Iterator[Problem]:
    """Problems of one split, deterministic in (split, seed, opts); train is an endless stream."""
    rng = random.Random(f"arithmetic/{split}/{seed}")  # str seeds are hashed with SHA-512: stable everywhere
    if split == "test" and _space_size(opts) <= ENUMERATE_LIMIT:
        triples: Iterator[tuple[int, int, str]] = iter(_enumerated_test(rng, opts))
    else:
        triples = _sampled(split, rng, opts)
    for i, (a, b, op) in enumerate(triples):
        p = arithmetic_problem(a, b, op, id=f"arithmetic/{split}/{i}", system=opts.system)
        p.meta["split"] = split
        yield p
