"""Numeric answer rewards: GSM8K (one number, compared exactly) and the `exact` verifier.

A GSM8K answer is a number, but models write it in many harmless ways: `$1,000`, `+72`, `72.0`,
`72%`, `72 eggs`, `\\$72`, `72.` All of these are the number 72 (or 1000). The rule is:

  * the extracted final answer (see `r1lab.chat.parse`) must contain exactly one number; several
    candidates (`72 or 73`, `8*9=72`) are rejected rather than guessed between;
  * a number is ASCII digits with an optional sign directly before it (`-`, `+` or the Unicode
    minus sign), thousands groups of exactly three digits after commas, and an optional decimal
    part; anything else around it (units, `$`, `%`, LaTeX wrappers) is ignored;
  * ONLY ASCII digits count: Python's `int()`/`float()` happily read Arabic-Indic, fullwidth and
    mathematical-bold digits, which is a known way to fool a grader; an answer holding any
    non-ASCII numeric character is rejected;
  * invisible LaTeX (`\\phantom{72}`) is removed first (see `r1lab.rewards.guards`);
  * numbers are compared exactly as fractions, so `72.0 == 72` and `-3 != 3`.

`exact_reward` uses the same rule when the reference is a number, and whitespace-normalised string
equality otherwise (the built-in arithmetic task's verifier).
"""

from __future__ import annotations

import re
from fractions import Fraction

from r1lab.chat import parse
from r1lab.config import R1labError
from r1lab.rewards.base import Reward
from r1lab.rewards.guards import has_non_ascii_digits, strip_phantoms

# A run of digits that may hold thousands commas, then an optional decimal part; or a bare decimal
# part (".5"). Linear: no nested quantifiers over the same characters.
_NUMBER = re.compile(r"[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+")
_GROUPED = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+")
_PLAIN_NUMBER = re.compile(r"[-+\u2212]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|[-+\u2212]?\.[0-9]+")
_SIGNS = {"-": -1, "\u2212": -1, "+": 1}


class RewardError(R1labError):
    """A reference answer a verifier cannot use (e.g. a GSM8K reference that is not a number)."""


def numbers_in(text: str) -> list[Fraction] | None:
    """Every number written in `text`, as exact fractions; None if one is malformed (e.g. `1,22`).

    >>> numbers_in("She pays $1,250.50 for 3 eggs")
    [Fraction(2501, 2), Fraction(3, 1)]
    >>> numbers_in("-3 and +4")
    [Fraction(-3, 1), Fraction(4, 1)]
    >>> numbers_in("1,22") is None
    True
    """
    out: list[Fraction] = []
    for m in _NUMBER.finditer(text):
        token = m.group()
        whole, dot, frac = token.partition(".")
        whole = whole.rstrip(",")  # "72, 73": the comma separates, it does not group
        if dot and whole.endswith(","):
            return None
        if "," in whole and not _GROUPED.fullmatch(whole):
            return None  # "1,22" or "12,3456": a decimal comma or a typo, not a thousands separator
        digits = whole.replace(",", "") + (dot + frac if dot else "")
        sign = _SIGNS.get(text[m.start() - 1], 1) if m.start() > 0 else 1
        out.append(sign * Fraction(digits))
    return out


def single_number(text: str) -> Fraction | None:
    """The one number in `text`, or None if there are none, several, or look-alike digits.

    >>> single_number("72 dollars."), single_number("\\\\$72.0"), single_number("72%")
    (Fraction(72, 1), Fraction(72, 1), Fraction(72, 1))
    >>> single_number("72 or 73") is None, single_number("\\u0667\\u0662") is None
    (True, True)
    """
    if has_non_ascii_digits(text):
        return None
    numbers = numbers_in(strip_phantoms(text))
    if numbers is None or len(numbers) != 1:
        return None
    return numbers[0]


def is_plain_number(text: str) -> bool:
    """True if `text` is just a number (sign, thousands commas, decimals), nothing around it.

    >>> is_plain_number(" -1,250.5 "), is_plain_number("72 eggs"), is_plain_number("\\frac{1}{2}")
    (True, False, False)
    """
    return _PLAIN_NUMBER.fullmatch(text.strip()) is not None


def _reference_number(reference: str) -> Fraction:
    value = single_number(reference)
    if value is None:
        raise RewardError(f"reference answer {reference!r} is not a single number (numeric verifier)")
    return value


def numeric_accuracy(answer: str | None, reference: str) -> float:
    """1.0 if the extracted `answer` holds exactly one number and it equals the reference's number."""
    gold = _reference_number(reference)
    if answer is None:
        return 0.0
    got = single_number(answer)
    return 1.0 if got is not None and got == gold else 0.0


def gsm8k_reward(text: str, reference: str) -> Reward:
    """GSM8K accuracy of a completion: its final answer is the reference number.

    >>> gsm8k_reward("<think>9*8</think> The answer is $72.", "72")
    Reward(score=1.0, parts={'accuracy': 1.0}, answer='72')
    >>> gsm8k_reward("<think>9*8</think> \\\\boxed{73}", "72").score
    0.0
    """
    answer = parse(text).answer
    acc = numeric_accuracy(answer, reference)
    return Reward(acc, {"accuracy": acc}, answer)


def _normalise_text(s: str) -> str:
    return " ".join(s.split()).rstrip(".").strip()


def exact_accuracy(answer: str | None, reference: str) -> float:
    """Numeric equality when the reference is a number, else whitespace-normalised string equality."""
    if answer is None:
        return 0.0
    if is_plain_number(reference):
        return numeric_accuracy(answer, reference)
    return 1.0 if _normalise_text(answer) == _normalise_text(reference) else 0.0


def exact_reward(text: str, reference: str) -> Reward:
    """Exact-match accuracy (the arithmetic task's verifier): numbers compared as numbers.

    >>> exact_reward("<think>6*7</think> 42", "42").score, exact_reward("42.0", "42").score
    (1.0, 1.0)
    >>> exact_reward("the answer is blue.", "blue").score, exact_reward("-42", "42").score
    (1.0, 0.0)
    """
    answer = parse(text).answer
    acc = exact_accuracy(answer, reference)
    return Reward(acc, {"accuracy": acc}, answer)
