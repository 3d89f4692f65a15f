"""Math answer equivalence with math-verify: `\\frac{1}{2}`, `0.5` and `1/2` are the same answer.

`math_equal(gold, pred, ...)` is math-verify's own comparison, exposed with its settings as keyword
arguments: both strings are parsed by `math_verify.parse` (LaTeX with boxed answers first, then
plain expressions) and compared by `math_verify.verify` (numbers to a rounding precision, sympy
simplification, sets, intervals, matrices, equations).

`math_reward(text, reference)` is what RL and evaluation use. It takes the final answer that
`r1lab.chat.parse` extracts from the text outside `<think>` (never an answer hidden in the
reasoning), wraps it and the reference in `\\boxed{...}` so math-verify reads each as one LaTeX
answer, and compares. Before math-verify sees it, an answer is rejected if it holds look-alike
digits, unbalanced braces (which could smuggle a second `\\boxed{}` past the parser), a logical
"or" between candidates, or a list of answers against a single reference, and `\\phantom{}`
groups are removed (see `r1lab.rewards.guards`).
Answers are at most `chat.MAX_ANSWER_CHARS` long, and every math-verify call runs under its SIGALRM
timeouts, so a pathological answer (`9^{9^{9^{9}}}`) costs a few seconds at worst, never a hang.
SIGALRM only works in the main thread: elsewhere the timeouts are off (math-verify's own
limitation) and the length cap is the only guard.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from r1lab.chat import parse
from r1lab.rewards.base import Reward
from r1lab.rewards.guards import has_non_ascii_digits, is_list, lists_candidates, strip_phantoms

#: seconds math-verify may spend parsing one string, and on one comparison (its own default)
TIMEOUT_S = 5
_warmed = False
DEFAULT_MATCH_TYPES = ("latex", "expr")


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which Python allows only in the main thread."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _extraction_config(match_types: tuple[str, ...] | None) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    if match_types is None:  # the library's defaults
        return [LatexExtractionConfig(), ExprExtractionConfig()]
    config: list[Any] = []
    for kind in match_types:
        if kind == "latex":
            config.append(LatexExtractionConfig(boxed_match_priority=0))
        elif kind == "expr":
            config.append(ExprExtractionConfig())
        else:
            raise ValueError(f"unknown math-verify match type {kind!r} (expected 'latex' or 'expr')")
    return config


def _warm_up() -> None:
    """Parse and compare one typical answer without a timeout, once per process.

    The first parse builds the LaTeX grammar's tables and sympy's caches, which takes seconds on a
    busy machine; under the timeout that would reject the very first (correct) answer graded.
    """
    global _warmed
    if _warmed:
        return
    from math_verify import parse as mv_parse
    from math_verify import verify

    config = _extraction_config(DEFAULT_MATCH_TYPES)
    log = logging.getLogger("math_verify")
    level = log.level
    log.setLevel(logging.ERROR)  # math-verify warns whenever a timeout is off, as it is here on purpose
    try:
        gold = mv_parse(
            "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", extraction_config=config, parsing_timeout=None
        )
        pred = mv_parse("\\boxed{(3, \\pi/2)}", extraction_config=config, parsing_timeout=None)
        verify(gold, pred, timeout_seconds=None)
    finally:
        log.setLevel(level)
    _warmed = True


@lru_cache(maxsize=8192)
def _parsed(text: str, match_types: tuple[str, ...] | None, timeout: int | None) -> tuple[Any, ...]:
    """math-verify's parse of one string, cached: the audit and RL grade the same gold many times."""
    from math_verify import parse as mv_parse

    _warm_up()
    try:
        return tuple(
            mv_parse(text, extraction_config=_extraction_config(match_types), parsing_timeout=timeout)
        )
    except Exception:  # math-verify reports its own failures as an empty parse; be as forgiving
        return ()


def math_equal(
    gold: str,
    pred: str,
    *,
    match_types: Sequence[str] | None = DEFAULT_MATCH_TYPES,
    precision: int = 6,
    strict: bool = True,
    allow_set_relation_comp: bool = False,
) -> bool:
    """True if math-verify judges `pred` equivalent to `gold` (both raw strings, parsed by it).

    `match_types`: "latex" and/or "expr" extraction (None: math-verify's defaults); `precision`:
    decimal places floats are rounded to; `strict`: variables must match and sets are not tuples;
    `allow_set_relation_comp`: compare `1 < x < 2` with `(1, 2)`.

    >>> math_equal("$\\\\frac{1}{2}$", "0.5"), math_equal("$\\\\sqrt{2}$", "1.41")
    (True, False)
    """
    types = None if match_types is None else tuple(match_types)
    return _equal(gold, pred, types, precision, strict, allow_set_relation_comp, _timeout())


@lru_cache(maxsize=16384)
def _equal(
    gold: str,
    pred: str,
    types: tuple[str, ...] | None,
    precision: int,
    strict: bool,
    set_rel: bool,
    timeout: int | None,
) -> bool:
    """`math_equal`, cached: RL groups and the audit compare the same answer pairs again and again."""
    gold_parsed, pred_parsed = _parsed(gold, types, timeout), _parsed(pred, types, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    from math_verify import verify

    try:
        return bool(
            verify(
                list(gold_parsed),
                list(pred_parsed),
                float_rounding=precision,
                strict=strict,
                allow_set_relation_comp=set_rel,
                timeout_seconds=timeout,
            )
        )
    except Exception:  # a comparison sympy cannot finish is not a match
        return False


def _strip_math_delimiters(answer: str) -> str:
    """Drop `$`, `\\(`, `\\)`, `\\[`, `\\]` math delimiters; keep `\\$` (a dollar sign in LaTeX)."""
    out: list[str] = []
    i, n = 0, len(answer)
    while i < n:
        ch = answer[i]
        if ch == "\\" and i + 1 < n:
            nxt = answer[i + 1]
            if nxt not in "()[]":
                out.append(answer[i : i + 2])
            i += 2
            continue
        if ch != "$":
            out.append(ch)
        i += 1
    return "".join(out).strip()


def _braces_balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def clean_math_answer(answer: str | None) -> str | None:
    """The extracted answer as LaTeX for math-verify (no `$`, no phantoms), or None if it must be rejected.

    >>> clean_math_answer("$\\\\frac{1}{2}$")
    '\\\\frac{1}{2}'
    >>> clean_math_answer("73} \\\\boxed{72") is None, clean_math_answer("\\uff17\\uff12") is None
    (True, True)
    """
    if answer is None or has_non_ascii_digits(answer):
        return None
    inner = _strip_math_delimiters(answer)
    if not _braces_balanced(inner):
        return None
    inner = strip_phantoms(inner).strip()
    if not inner or "\\boxed" in inner or "\\fbox" in inner or lists_candidates(inner):
        return None
    return inner


def math_accuracy(answer: str | None, reference: str, **settings: Any) -> float:
    """1.0 if the extracted answer is math-verify-equivalent to the reference, else 0.0.

    Both are wrapped in `\\boxed{}` so math-verify reads each as one LaTeX answer. A list of
    answers counts only against a reference that is a list (`guards.is_list`).
    """
    pred = clean_math_answer(answer)
    if pred is None or (is_list(pred) and not is_list(reference)):
        return 0.0
    gold = "\\boxed{" + reference.strip() + "}"
    return 1.0 if math_equal(gold, "\\boxed{" + pred + "}", **settings) else 0.0


def math_reward(text: str, reference: str) -> Reward:
    """Accuracy of a completion's final answer against a LaTeX or plain reference (math-verify).

    >>> math_reward("<think>half</think> The answer is \\\\boxed{\\\\dfrac{2}{4}}", "\\\\frac{1}{2}").score
    1.0
    >>> math_reward("<think>\\\\boxed{\\\\frac{1}{2}}</think> no idea", "\\\\frac{1}{2}").score
    0.0
    """
    answer = parse(text).answer
    acc = math_accuracy(answer, reference)
    return Reward(acc, {"accuracy": acc}, answer)
