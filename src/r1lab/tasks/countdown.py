"""Countdown, TinyZero's task: combine 3-4 numbers with + - * / to reach a target, each number once.

`solve_countdown` is an exact solver. A bitmask dynamic programme computes, for every subset of the
numbers, every value it can make (as an exact rational, so 7/2*2 is exactly 7), by combining
the values of each split of the subset into two disjoint parts with each operator (both orders for
- and /). Every binary expression tree is the combination of its two subtrees, so this covers all
orderings, operators and parenthesisations, and each number is used exactly once. Only a
back-pointer is stored per value; the equation string is built for the one value asked for.

The generator (`iter_countdown`) draws `n_numbers` numbers in 1..max_number, computes what they can
reach, and picks a target uniformly among the reachable integers in [target_min, target_max]. So
every instance is solvable by construction, and the solver's equation is kept in
`meta["solution"]`. The split is by `holdout.in_test_bucket` of the sorted numbers alone, whatever the
target: test draws only from the bucket, and train skips the bucket *and* every number set of the
shipped Countdown test files. So training on the generator never sees the numbers of a problem that
any Countdown evaluation in r1lab uses (not even with another target), and the test draw can skip
the solver for the 95% of number sets that are not in its bucket.

    r1lab tasks show countdown --split test --n 3
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from functools import lru_cache
from math import gcd

from pydantic import Field, model_validator

from r1lab.chat import r1_messages
from r1lab.tasks.base import Problem, TaskError
from r1lab.tasks.files import Source, get_field, get_int_list, read_rows, shipped_file
from r1lab.tasks.holdout import in_test_bucket
from r1lab.tasks.options import Options

#: Shipped Countdown test files (under r1lab/data/); the generator's train stream avoids their number sets.
SHIPPED_TEST_FILES = ("countdown/test_hf_rows_10000_11023.jsonl", "countdown/test_tinyzero_default.jsonl")

#: Draws in a row without a usable instance before the generator gives up (never hang).
MAX_MISSES = 1000

# value -> how it was made: None for a leaf, else (op, left_mask, left_value, right_mask, right_value)
# An exact rational as (numerator, denominator) in lowest terms, denominator > 0. Plain int pairs
# rather than fractions.Fraction: the search does thousands of operations per instance and Fraction's
# Python-level arithmetic made it ~10x slower.
Value = tuple[int, int]
Back = tuple[str, int, Value, int, Value] | None


class CountdownOptions(Options):
    """Options of the `countdown` generator."""

    n_numbers: int = Field(3, ge=2, le=4, description="how many numbers per instance")
    max_number: int = Field(99, ge=1, le=999, description="numbers are drawn from 1..max_number")
    target_min: int = Field(10, ge=0, description="smallest target (TinyZero's data: 10)")
    target_max: int = Field(100, ge=1, description="largest target (TinyZero's data: 100)")
    system: bool = Field(
        False, description="prepend the R1 system prompt (off: tiny models see only the question)"
    )

    @model_validator(mode="after")
    def _targets_ordered(self) -> CountdownOptions:
        if self.target_min > self.target_max:
            raise ValueError(f"target_min ({self.target_min}) is above target_max ({self.target_max})")
        return self


def countdown_prompt(nums: Sequence[int], target: int) -> str:
    """The question text (TinyZero's wording, without its output-format instructions).

    >>> countdown_prompt([79, 17, 60], 36)
    'Using the numbers [79, 17, 60], create an equation that equals 36. You can use basic arithmetic operations (+, -, *, /) and each number exactly once.'
    """
    return (
        f"Using the numbers {list(nums)}, create an equation that equals {target}. "
        "You can use basic arithmetic operations (+, -, *, /) and each number exactly once."
    )


def countdown_problem(
    nums: Sequence[int], target: int, *, id: str | None = None, system: bool = False, meta: dict | None = None
) -> Problem:
    """One Countdown problem; `meta` adds keys (task, split, row index) to `nums`/`target`."""
    nums = [int(n) for n in nums]
    info = {"task": "countdown", "nums": nums, "target": int(target)}
    info.update(meta or {})
    info["verifier"] = "countdown"
    pid = id if id is not None else f"countdown/{','.join(map(str, nums))}={target}"
    return Problem(
        id=pid, messages=r1_messages(countdown_prompt(nums, target), system), reference=str(target), meta=info
    )


# --------------------------------------------------------------------------- the solver


def _ratio(num: int, den: int) -> Value:
    """`num/den` in lowest terms with a positive denominator (den != 0)."""
    if den < 0:
        num, den = -num, -den
    g = gcd(num, den)
    return (num // g, den // g) if g > 1 else (num, den)


def _results(a: Value, b: Value) -> list[tuple[int, int, str]]:
    """`a op b` for each op, plus `b - a` and `b / a` ("-r", "/r"), as unreduced (num, den, op)."""
    an, ad = a
    bn, bd = b
    p, q, den = an * bd, bn * ad, ad * bd
    out = [(p + q, den, "+"), (an * bn, den, "*"), (p - q, den, "-"), (q - p, den, "-r")]
    if bn:
        out.append((p, ad * bn, "/"))
    if an:
        out.append((q, bd * an, "/r"))
    return out


def _reachable(nums: Sequence[int], bounds: tuple[int, int] | None = None) -> list[dict[Value, Back]]:
    """For every subset mask of `nums`: the values it makes (using all of it) and a back-pointer each.

    With `bounds=(lo, hi)`, the full set keeps only the integers in [lo, hi]: that is all a caller
    looking for a target needs, and most of the work is at that last level.
    Among the ways to make a value, one whose every intermediate result is a non-negative integer is
    preferred (what a person would write, and what a small model copies best); otherwise the first.
    """
    n = len(nums)
    full = (1 << n) - 1
    table: list[dict[Value, Back]] = [{} for _ in range(1 << n)]
    clean: list[set[Value]] = [set() for _ in range(1 << n)]  # values with a non-negative-integer derivation
    for i, x in enumerate(nums):
        table[1 << i] = {(int(x), 1): None}
        clean[1 << i] = {(int(x), 1)} if x >= 0 else set()
    for mask in range(1, 1 << n):  # every proper submask is smaller than mask, so already filled
        if mask & (mask - 1) == 0:
            continue
        out, out_clean = table[mask], clean[mask]
        only_ints = bounds is not None and mask == full
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            if sub < rest:  # each unordered split once; the non-commutative ops are tried both ways
                for a in table[sub]:
                    a_clean = a in clean[sub]
                    for b in table[rest]:
                        both_clean = a_clean and b in clean[rest]
                        for num, den, op in _results(a, b):
                            if only_ints:
                                if num % den or not bounds[0] <= num // den <= bounds[1]:
                                    continue
                                v = (num // den, 1)
                            else:
                                v = (num, 1) if den == 1 else _ratio(num, den)
                            is_clean = both_clean and v[1] == 1 and v[0] >= 0
                            if v in out and (not is_clean or v in out_clean):
                                continue
                            # "-r" and "/r" are b - a and b / a: the right part comes first
                            out[v] = (op, sub, a, rest, b) if len(op) == 1 else (op[0], rest, b, sub, a)
                            if is_clean:
                                out_clean.add(v)
            sub = (sub - 1) & mask
    return table


def _equation(table: list[dict[Value, Back]], mask: int, value: Value) -> str:
    back = table[mask][value]
    if back is None:
        return str(value[0])
    op, lmask, lval, rmask, rval = back
    left, right = _equation(table, lmask, lval), _equation(table, rmask, rval)
    # Parenthesise every compound operand: always correct, and easy for a small model to copy.
    left = left if table[lmask][lval] is None else f"({left})"
    right = right if table[rmask][rval] is None else f"({right})"
    return f"{left} {op} {right}"


def solve_countdown(nums: Sequence[int], target: int) -> str | None:
    """An equation using each of `nums` exactly once that equals `target`, or None if none exists.

    >>> solve_countdown([79, 17, 60], 36)
    '(79 + 17) - 60'
    >>> solve_countdown([2, 2], 5) is None
    True
    """
    nums = tuple(int(n) for n in nums)
    table = _reachable(nums, (int(target), int(target)))
    full = (1 << len(nums)) - 1
    goal = (int(target), 1)
    return _equation(table, full, goal) if goal in table[full] else None


# --------------------------------------------------------------------------- the split


def canonical(nums: Sequence[int]) -> str:
    """The order-free form the split hashes: the number multiset, `countdown:17,60,79`."""
    return f"countdown:{','.join(str(n) for n in sorted(nums))}"


def countdown_rows(source: Source) -> Iterator[tuple[str, list[int], int, dict]]:
    """`(where, nums, target, row)` for each row of a Countdown file with fields `nums` and `target`."""
    for where, row in read_rows(source):
        nums = get_int_list(row, "nums", where)
        target = get_field(row, "target", int, where)
        yield where, nums, target, row


@lru_cache(maxsize=1)
def _shipped_test_sets() -> frozenset[tuple[int, ...]]:
    return frozenset(
        tuple(sorted(nums))
        for rel in SHIPPED_TEST_FILES
        for _, nums, _, _ in countdown_rows(shipped_file(rel))
    )


def is_test_countdown(nums: Sequence[int]) -> bool:
    """True iff these numbers are held out (any target): in the generator's test bucket or in a
    shipped Countdown test file. The train stream never yields such numbers."""
    return in_test_bucket(canonical(nums)) or tuple(sorted(nums)) in _shipped_test_sets()


# --------------------------------------------------------------------------- the generator


def iter_countdown(split: str, seed: int, opts: CountdownOptions) -> Iterator[Problem]:
    """Solvable instances, deterministic in (split, seed, opts). Train is an endless stream; test
    draws distinct instances and ends when no new one turns up in `MAX_MISSES` draws."""
    rng = random.Random(f"countdown/{split}/{seed}")  # str seeds are hashed with SHA-512: stable everywhere
    want_test = split == "test"
    seen: set[tuple[tuple[int, ...], int]] = set()  # test instances already drawn
    full = (1 << opts.n_numbers) - 1
    index, misses = 0, 0
    while misses < MAX_MISSES:
        nums = [rng.randint(1, opts.max_number) for _ in range(opts.n_numbers)]
        held_out = in_test_bucket(canonical(nums)) if want_test else is_test_countdown(nums)
        if held_out != want_test:
            misses += 1
            continue
        table = _reachable(nums, (opts.target_min, opts.target_max))
        key = tuple(sorted(nums))
        candidates = [t for t, _ in table[full] if (key, t) not in seen]  # integers in range only
        if not candidates:
            misses += 1
            continue
        misses = 0
        target = rng.choice(sorted(candidates))
        if want_test:
            seen.add((key, target))
        meta = {"split": split, "solution": _equation(table, full, (target, 1))}
        yield countdown_problem(nums, target, id=f"countdown/{split}/{index}", system=opts.system, meta=meta)
        index += 1
    if not want_test:
        raise TaskError(
            f"task 'countdown': no solvable train instance in {MAX_MISSES} draws; "
            "widen max_number or the target range"
        )
