"""The synthetic pretraining corpus (`r1lab.tasks.corpus`): column working that adds up, slips that
are real mistakes, self-checks that fix them, and no held-out problem in the training data.

The quickstart's "aha moment" rests on these properties: if a slipped pass could still be right, or
a check could still be wrong, RL would have less reason to keep reflection.
"""

from __future__ import annotations

import random
import re

import pytest

from r1lab.chat import parse
from r1lab.tasks.arithmetic import arithmetic_problem, is_test_arithmetic
from r1lab.tasks.base import TaskError
from r1lab.tasks.corpus import (
    CHECK_PHRASE,
    CorpusMix,
    addition_completion,
    build_arithmetic_corpus,
    column_working,
    parse_addition,
)

LINE = re.compile(r"(\d)\+(\d)\+(\d)=(\d+)")


def random_pairs(n: int, seed: int, max_digits: int = 6) -> list[tuple[int, int]]:
    """Operands with independently drawn digit counts, so unequal lengths and long carries occur."""
    rng = random.Random(seed)

    def number() -> int:
        d = rng.randint(1, max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    return [(number(), number()) for _ in range(n)]


def train_pairs(n: int, seed: int, digits: int = 4) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        a, b = rng.randint(0, 10**digits - 1), rng.randint(0, 10**digits - 1)
        if not is_test_arithmetic(a, b, "+"):
            pairs.append((a, b))
    return pairs


def a_test_pair() -> tuple[int, int]:
    return next((a, b) for a in range(10, 100) for b in range(10, 100) if is_test_arithmetic(a, b, "+"))


def answer(text: str) -> str | None:
    return parse(text).answer


# --------------------------------------------------------------------------- column working


def test_column_working_adds_up():
    for a, b in random_pairs(500, seed=0) + [(0, 0), (9, 1), (99999, 1), (1, 99999), (5, 5)]:
        lines, result = column_working(a, b)
        assert result == a + b, (a, b)
        rows = [LINE.fullmatch(x).groups() for x in lines.splitlines()]
        assert len(rows) == max(len(str(a)), len(str(b)))  # one line per column, lowest digit first
        carry = 0
        for i, (x, y, c, s) in enumerate(rows):
            assert (int(x), int(y)) == (a // 10**i % 10, b // 10**i % 10), (a, b, i)
            assert int(c) == carry and int(s) == int(x) + int(y) + carry, (a, b, i)
            carry = int(s) // 10


def test_a_slip_moves_the_result_by_one_unit_of_its_column():
    rng = random.Random(1)
    checked = 0
    for a, b in random_pairs(1000, seed=2):
        width = max(len(str(a)), len(str(b)))
        column, slip = rng.randrange(width), rng.choice((-1, 1))
        exact = a // 10**column % 10 + b // 10**column % 10 + (a % 10**column + b % 10**column) // 10**column
        if not 0 <= exact + slip <= 19:
            continue  # the column sum is 0 or 19: see the test below
        lines, result = column_working(a, b, slip_column=column, slip=slip)
        assert result != a + b and abs(result - (a + b)) == 10**column
        x, y, c, s = LINE.fullmatch(lines.splitlines()[column]).groups()
        assert int(s) == int(x) + int(y) + int(c) + slip  # the slip is on the line of its column
        checked += 1
    assert checked > 950


@pytest.mark.parametrize("a, b, column, slip", [(10, 20, 0, -1), (99, 99, 1, 1)])
def test_a_slip_at_the_edge_of_the_column_range_is_still_a_mistake(a, b, column, slip):
    assert column_working(a, b, slip_column=column, slip=slip)[1] != a + b


# --------------------------------------------------------------------------- completions


@pytest.mark.parametrize("style", ["direct", "working", "check"])
def test_every_style_parses_to_the_sum_without_slips(style):
    rng = random.Random(0)
    for a, b in random_pairs(200, seed=3):
        text = addition_completion(a, b, style, rng, slip_rate=0.0)
        parsed = parse(text)
        assert parsed.answer == str(a + b), text
        assert parsed.well_formed, text


def test_only_the_check_style_reflects():
    rng = random.Random(0)
    texts = {s: addition_completion(4821, 3177, s, rng, 0.0) for s in ("direct", "working", "check")}
    assert "wait" in texts["check"] and CHECK_PHRASE in texts["check"]
    assert "wait" not in texts["direct"] and "wait" not in texts["working"]
    assert texts["direct"] == "<think></think>7998"


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError, match="sideways"):
        addition_completion(1, 2, "sideways", random.Random(0), 0.0)


def working_result(text: str) -> int:
    """The number a column-working pass adds up to (digits lowest first, then the last carry)."""
    digits, carry = [], 0
    for _x, _y, _c, total in LINE.findall(text):
        digits.append(int(total) % 10)
        carry = int(total) // 10
    if carry:
        digits.append(carry)
    return int("".join(str(d) for d in reversed(digits)))


def test_slips_are_wrong_about_slip_rate_of_the_time_and_checks_never():
    # 2000 draws at p = 0.4: the standard error is 0.011, so [0.35, 0.45] is a loose 4.5-sigma band
    # (a column summing to 0 or 19 can absorb a slip, which lowers the rate by well under 1%).
    rng = random.Random(1234)
    pairs = train_pairs(2000, seed=5)
    working = [addition_completion(a, b, "working", rng, 0.4) for a, b in pairs]
    wrong = sum(answer(t) != str(a + b) for t, (a, b) in zip(working, pairs, strict=True))
    assert 0.35 <= wrong / len(pairs) <= 0.45

    checks = [addition_completion(a, b, "check", rng, 0.4) for a, b in pairs]
    assert all(answer(t) == str(a + b) for t, (a, b) in zip(checks, pairs, strict=True))
    # ... and the first pass of a check slips as often, so the check really repairs answers
    guesses = [str(working_result(t.split(CHECK_PHRASE)[0])) for t in checks]
    caught = sum(g != str(a + b) for g, (a, b) in zip(guesses, pairs, strict=True))
    assert 0.35 <= caught / len(pairs) <= 0.45


# --------------------------------------------------------------------------- the corpus


def problems(pairs):
    return [arithmetic_problem(a, b, "+") for a, b in pairs]


def test_corpus_is_deterministic_by_seed():
    train = problems(train_pairs(60, seed=7))
    mix = CorpusMix()
    first, again = build_arithmetic_corpus(train, mix, seed=3), build_arithmetic_corpus(train, mix, seed=3)
    assert first == again
    assert [c for _, c in build_arithmetic_corpus(train, mix, seed=4)] != [c for _, c in first]
    assert [p for p, _ in first] == train  # one row per problem, in order


def test_corpus_mix_shares_are_respected():
    train = problems(train_pairs(1000, seed=8))
    rows = build_arithmetic_corpus(train, CorpusMix(direct=0.5, working=0.3, check=0.2, slip_rate=0.0), 0)
    direct = sum(c.startswith("<think></think>") for _, c in rows) / len(rows)
    check = sum(CHECK_PHRASE in c for _, c in rows) / len(rows)
    assert 0.44 <= direct <= 0.56 and 0.15 <= check <= 0.25
    assert all(answer(c) == p.reference for p, c in rows)  # no slips: every row is right


def test_corpus_refuses_a_held_out_problem():
    a, b = a_test_pair()
    train = problems(train_pairs(5, seed=9))
    with pytest.raises(TaskError, match=rf"{a}\+{b}.*held-out"):
        build_arithmetic_corpus([*train, arithmetic_problem(a, b, "+")], CorpusMix(), seed=0)
    with pytest.raises(TaskError, match="held-out"):  # in either operand order
        build_arithmetic_corpus([arithmetic_problem(b, a, "+")], CorpusMix(), seed=0)


@pytest.mark.parametrize("op", ["-", "*"])
def test_corpus_supports_additions_only(op):
    with pytest.raises(TaskError, match="additions"):
        build_arithmetic_corpus([arithmetic_problem(52, 31, op)], CorpusMix(), seed=0)


def test_parse_addition_reads_the_operands():
    assert parse_addition(arithmetic_problem(4821, 3177, "+")) == (4821, 3177)
    assert parse_addition(arithmetic_problem(7, 5, "+", system=True)) == (7, 5)


def test_a_check_follows_a_slip_at_the_check_slip_rate():
    """By default (check_slip_rate 1) every check repairs a slipped first pass, so copying the first
    pass is never a safe shortcut for the careful one."""
    rng = random.Random(9)
    pairs = train_pairs(500, seed=6)
    checks = [addition_completion(a, b, "check", rng, 0.4, check_slip_rate=1.0) for a, b in pairs]
    firsts = [working_result(t.split(CHECK_PHRASE)[0]) for t in checks]
    assert all(f != a + b for f, (a, b) in zip(firsts, pairs, strict=True))
    assert all(answer(t) == str(a + b) for t, (a, b) in zip(checks, pairs, strict=True))
    assert CorpusMix().check_slip_rate == 1.0
