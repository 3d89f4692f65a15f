"""`r1lab audit-verifier TASK [--limit N] [--json PATH] [--workers W]`: does the verifier grade right?

A reward that can be fooled is what RL learns to exploit, so every verifier is checked on each
problem of the task's test split, through the same parse and verifier `grade` uses (its accuracy
part, `r1lab.rewards.grader.accuracy`), exactly what RL and evaluation see:

  gold answers, written as a model would; all must be ACCEPTED
    gold_boxed       `<think>...</think> ... \\boxed{gold}`
    gold_phrase      `<think>...</think> The answer is gold`
  adversarial variants; all must be REJECTED
    off_by_one       gold+1 and gold-1 (numeric golds)
    other_answer     the next problem's answer, where the two differ (math-verify, both ways)
    empty            the empty completion
    think_only       the gold only inside the think block (closed, and never closed)
    candidates       `\\boxed{a} \\boxed{gold} \\boxed{b}`, "the answer is a or gold"
    long_padding     megabytes of padding around a wrong answer   (every LONG_EVERY-th problem)
    huge_answer      a megabyte-long answer                       (every LONG_EVERY-th problem)
    digits:*         the gold's digits in fullwidth, mathematical bold, Arabic-Indic
    latex_tricks     `\\boxed{\\text{gold}+1}`, `\\phantom{gold}`, gold in a `\\text{}` comment next
                     to a wrong box, `\\boxed{}`
  Countdown instead checks the solver's equation (accepted, also as `... = target`) against
  equations that reuse a number, omit one, use one not given, miss the target, divide by zero, or
  try code injection.

The table shows, per variant, how many were accepted and rejected and the error rate (false
negatives for gold, false positives for adversarial variants). Exit status 1 if any gold was
rejected or any adversarial variant accepted; `--json` writes the counts and the failures.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from r1lab.chat import THINK_CLOSE, THINK_OPEN
from r1lab.config import R1labError, TaskSpec
from r1lab.rewards.countdown import EquationError, check_equation, evaluate_equation
from r1lab.rewards.grader import accuracy
from r1lab.rewards.math_equiv import math_equal
from r1lab.rewards.numeric import is_plain_number, single_number
from r1lab.tasks.base import Problem

PAD_CHARS = 1_000_000  # each padding block: the long variants are megabytes in all
# Scanning megabytes costs ~0.1 s per problem, and the outcome hardly depends on the problem, so the
# long and huge variants run on every LONG_EVERY-th problem only.
LONG_EVERY = 10
_PAD = "padding " * (PAD_CHARS // 8)
_HUGE = "9" * PAD_CHARS
REASONING = "Let me work through this step by step, then check the result."
_LOOKALIKES = {"fullwidth": 0xFF10, "bold": 0x1D7CE, "arabic": 0x0660}  # code point of each digit 0


@dataclass(frozen=True)
class Variant:
    name: str
    text: str
    accept: bool  # what a correct verifier does with it


@dataclass
class Tally:
    accept: bool
    n: int = 0
    accepted: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def wrong(self) -> int:
        return self.n - self.accepted if self.accept else self.accepted


def _wrap(answer_text: str) -> str:
    return f"{THINK_OPEN}{REASONING}{THINK_CLOSE}\n{answer_text}"


def _shift(gold: str, delta: int) -> str | None:
    """gold + delta written plainly, for golds that are plain numbers; None otherwise."""
    value = single_number(gold) if is_plain_number(gold) else None
    if value is None:
        return None
    shifted = value + delta
    if shifted.denominator == 1:
        return str(shifted.numerator)
    return str(Decimal(shifted.numerator) / Decimal(shifted.denominator))


def _lookalike(gold: str, zero: int) -> str:
    return "".join(chr(zero + ord(c) - 48) if "0" <= c <= "9" else c for c in gold)


def _differ(a: str, b: str) -> bool:
    """Two answers that math-verify finds different whichever one is taken as the gold."""
    if is_plain_number(a) and is_plain_number(b):  # the same verdict, without parsing LaTeX
        return single_number(a) != single_number(b)
    return not math_equal("\\boxed{" + a + "}", "\\boxed{" + b + "}") and not math_equal(
        "\\boxed{" + b + "}", "\\boxed{" + a + "}"
    )


def _common_variants(gold: str, wrong: str | None, long: bool) -> Iterator[Variant]:
    """Adversarial variants shared by every answer-style verifier; `wrong` is a wrong answer if known."""
    yield Variant("empty", "", False)
    yield Variant("think_only", f"{THINK_OPEN}So the answer is \\boxed{{{gold}}}.{THINK_CLOSE}", False)
    yield Variant("think_only", f"{THINK_OPEN}{REASONING} The answer is {gold}", False)
    if long:
        yield Variant("huge_answer", _wrap(f"\\boxed{{{_HUGE}}}"), False)
        yield Variant("huge_answer", _wrap(f"The answer is {gold}{_HUGE}"), False)
    for zero_name, zero in _LOOKALIKES.items():
        if any("0" <= c <= "9" for c in gold):
            yield Variant(f"digits:{zero_name}", _wrap(f"\\boxed{{{_lookalike(gold, zero)}}}"), False)
    yield Variant("latex_tricks", _wrap("\\boxed{}"), False)
    yield Variant("latex_tricks", _wrap(f"\\boxed{{\\phantom{{{gold}}}}}"), False)
    if wrong is None:
        return
    yield Variant("candidates", _wrap(f"\\boxed{{{wrong}}} \\boxed{{{gold}}} \\boxed{{{wrong}1}}"), False)
    yield Variant("candidates", _wrap(f"The answer is {wrong} or {gold}"), False)
    if long:
        yield Variant("long_padding", f"{THINK_OPEN}{_PAD}{THINK_CLOSE}{_PAD}\\boxed{{{wrong}}}{_PAD}", False)
        yield Variant("long_padding", _wrap(f"{_PAD}\nThe answer is {wrong}"), False)
    yield Variant("latex_tricks", _wrap(f"\\boxed{{\\phantom{{{gold}}}{wrong}}}"), False)
    yield Variant("latex_tricks", _wrap(f"\\boxed{{{wrong}}} \\quad \\text{{(some say {gold})}}"), False)


def answer_variants(problem: Problem, other: Problem | None, long: bool = True) -> Iterator[Variant]:
    """Gold and adversarial completions for a verifier that reads a final answer (math, gsm8k, exact)."""
    gold = problem.reference.strip()
    yield Variant("gold_boxed", _wrap(f"So the final answer is \\boxed{{{gold}}}."), True)
    yield Variant("gold_phrase", _wrap(f"The answer is {gold}"), True)
    plus, minus = _shift(gold, 1), _shift(gold, -1)
    for shifted in (plus, minus):
        if shifted is not None:
            yield Variant("off_by_one", _wrap(f"\\boxed{{{shifted}}}"), False)
    if plus is not None:
        yield Variant("latex_tricks", _wrap(f"\\boxed{{\\text{{{gold}}}+1}}"), False)
    wrong = plus
    if other is not None and _differ(gold, other.reference.strip()):
        wrong = wrong or other.reference.strip()
        yield Variant("other_answer", _wrap(f"\\boxed{{{other.reference.strip()}}}"), False)
    yield from _common_variants(gold, wrong, long)


def countdown_variants(problem: Problem, other: Problem | None, long: bool = True) -> Iterator[Variant]:
    """The solver's equation (accepted) and equations that break one rule each (rejected)."""
    from r1lab.tasks import solve_countdown

    nums, target = [int(n) for n in problem.meta["nums"]], int(problem.meta["target"])
    eq = solve_countdown(nums, target)
    if eq is None:
        raise R1labError(f"problem {problem.id}: the solver finds no equation for {nums} -> {target}")
    yield Variant("gold_equation", _wrap(f"<answer>{eq}</answer>"), True)
    yield Variant("gold_equation", _wrap(f"<answer>{eq} = {target}</answer>"), True)
    yield Variant("reuse_number", _wrap(f"<answer>{eq} + {nums[0]} - {nums[0]}</answer>"), False)
    yield Variant("omit_number", _wrap(f"<answer>{_omit_one(nums, target)}</answer>"), False)
    unused = next(k for k in range(1, 200) if k not in nums)
    yield Variant("foreign_number", _wrap(f"<answer>({eq}) * {unused} / {unused}</answer>"), False)
    yield Variant("foreign_number", _wrap(f"<answer>{target}</answer>"), False)
    yield Variant("miss_target", _wrap(f"<answer>{_miss_target(nums, target)} = {target}</answer>"), False)
    yield Variant(
        "division_by_zero", _wrap(f"<answer>{eq} + {nums[0]} / ({nums[1]} - {nums[1]})</answer>"), False
    )
    yield Variant("code_injection", _wrap("<answer>__import__('os').system('true')</answer>"), False)
    if other is not None:
        other_eq = solve_countdown([int(n) for n in other.meta["nums"]], int(other.meta["target"]))
        if other_eq is not None and not check_equation(other_eq, nums, target):
            yield Variant("other_answer", _wrap(f"<answer>{other_eq}</answer>"), False)
    yield from _common_variants(eq, f"{eq} + 1", long)


def _omit_one(nums: list[int], target: int) -> str:
    """An equation over all numbers but one, reaching the target if the solver can, else their sum."""
    from r1lab.tasks import solve_countdown

    for i in range(len(nums)):
        rest = nums[:i] + nums[i + 1 :]
        eq = solve_countdown(rest, target)
        if eq is not None:
            return eq
    return " + ".join(map(str, nums[1:]))


def _miss_target(nums: list[int], target: int) -> str:
    """An equation using every number once whose value is not the target."""
    for op in (" + ", " * ", " - "):
        eq = op.join(map(str, nums))
        try:
            if evaluate_equation(eq)[0] != target:
                return eq
        except EquationError:
            continue
    return f"({' + '.join(map(str, nums))}) * 2"  # sum, product and difference all hit it: rare


def variants_for(problem: Problem, other: Problem | None, long: bool = True) -> list[Variant]:
    """Every variant of one problem; `other` supplies a different problem's answer."""
    verifier = problem.meta.get("verifier")
    if verifier == "countdown":
        return list(countdown_variants(problem, other, long))
    if verifier in ("math", "gsm8k", "exact"):
        return list(answer_variants(problem, other, long))
    raise R1labError(f"problem {problem.id}: audit-verifier does not cover verifier {verifier!r}")


def audit_one(index: int, problem: Problem, other: Problem | None) -> dict[str, Tally]:
    """Grade every variant of one problem (`index` decides whether the long variants run)."""
    from r1lab.chat import parse

    tallies: dict[str, Tally] = {}
    for v in variants_for(problem, other, long=index % LONG_EVERY == 0):
        accepted = accuracy(v.text, parse(v.text), problem) == 1.0
        t = tallies.setdefault(v.name, Tally(v.accept))
        t.n += 1
        t.accepted += accepted
        if accepted != v.accept:
            t.failures.append({"problem": problem.id, "reference": problem.reference, "text": v.text[:300]})
    return tallies


def _audit_chunk(jobs: list[tuple[int, Problem, Problem | None]]) -> list[dict[str, Tally]]:
    # Timeouts on adversarial answers are expected here; the table reports the outcomes that matter.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return [audit_one(*job) for job in jobs]


def _merge(into: dict[str, Tally], part: dict[str, Tally]) -> None:
    for name, t in part.items():
        total = into.setdefault(name, Tally(t.accept))
        total.n += t.n
        total.accepted += t.accepted
        total.failures += t.failures[: max(0, 20 - len(total.failures))]


def audit(problems: list[Problem], progress: bool = True, workers: int = 1) -> dict[str, Tally]:
    """Grade every variant of every problem; counts per variant name.

    math-verify is CPU-bound Python, so `workers > 1` spreads problems over processes (each has its
    own main thread, which math-verify's SIGALRM timeouts need).
    """
    from rich.progress import Progress

    n = len(problems)
    jobs = [(i, p, problems[(i + 1) % n] if n > 1 else None) for i, p in enumerate(problems)]
    chunks = [jobs[lo : lo + 8] for lo in range(0, n, 8)]
    tallies: dict[str, Tally] = {}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("auditing", total=n)
        if workers <= 1:
            results = map(_audit_chunk, chunks)
            for chunk, parts in zip(chunks, results, strict=True):
                for part in parts:
                    _merge(tallies, part)
                bar.advance(task, len(chunk))
            return tallies
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the progress bar runs a thread, and forking a threaded process is unsafe.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for chunk, parts in zip(chunks, pool.map(_audit_chunk, chunks), strict=True):
                for part in parts:
                    _merge(tallies, part)
                bar.advance(task, len(chunk))
    return tallies


def _table(task: str, tallies: dict[str, Tally]):
    from rich.table import Table

    table = Table(title=f"audit-verifier {task}")
    for col in ("variant", "must", "n", "accepted", "rejected", "error"):
        table.add_column(col, justify="left" if col in ("variant", "must") else "right", no_wrap=True)
    for name, t in tallies.items():
        rate = t.wrong / t.n if t.n else 0.0
        kind = "accept" if t.accept else "reject"
        error = f"{'FN' if t.accept else 'FP'} {rate:.2%}"
        style = "red" if t.wrong else None
        table.add_row(name, kind, str(t.n), str(t.accepted), str(t.n - t.accepted), error, style=style)
    return table


def add_arguments(parser) -> None:
    parser.add_argument("task", help="task name, e.g. gsm8k, math500, aime2024, countdown-hf, arithmetic")
    parser.add_argument("--limit", type=int, default=None, help="audit only the first N test problems")
    parser.add_argument("--path", default=None, help="data file for file-backed tasks (e.g. jsonl)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write counts and failures as JSON")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes grading in parallel"
    )


def run(args) -> int:
    from rich.console import Console

    from r1lab.tasks import load_task

    if args.limit is not None and args.limit < 1:
        raise R1labError(f"--limit must be >= 1 (got {args.limit})")
    problems = load_task(TaskSpec(name=args.task, split="test", limit=args.limit, path=args.path))
    if not problems:
        raise R1labError(f"task {args.task!r}: no test problems")
    tallies = audit(problems, workers=args.workers)
    console = Console()
    console.print(_table(args.task, tallies))
    failed = {name: t for name, t in tallies.items() if t.wrong}
    for name, t in failed.items():
        for f in t.failures[:3]:
            console.print(
                f"[red]{name}[/red] {f['problem']} (reference {f['reference']!r}): {f['text'][:160]!r}"
            )
    if args.json:
        report = {
            "task": args.task,
            "problems": len(problems),
            "variants": {
                name: {
                    "should_accept": t.accept,
                    "n": t.n,
                    "accepted": t.accepted,
                    "wrong": t.wrong,
                    "failures": t.failures,
                }
                for name, t in tallies.items()
            },
        }
        Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    console.print("verifier OK" if not failed else f"[red]verifier FAILED on {', '.join(failed)}[/red]")
    return 1 if failed else 0
