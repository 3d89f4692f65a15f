"""Checks every verifier applies to an extracted answer before reading it: tricks a grader must not fall for.

Found with `r1lab audit-verifier` and by probing math-verify directly:

  * look-alike digits: Python's `int()`/`float()` read Arabic-Indic (`٧٢`), fullwidth (`７２`) and
    mathematical-bold (`𝟕𝟐`) digits as 72; a verifier must see only ASCII digits;
  * invisible LaTeX: `\\phantom{72}` renders as blank space, yet math-verify reads the 72 inside it,
    so `\\boxed{\\phantom{72}}` (a box that looks empty) would be graded correct; phantoms are removed;
  * logical "or": math-verify accepts `\\boxed{73 \\lor 72}` (and `\\vee`) for the gold 72, which lets a
    model list candidates; such answers are rejected;
  * lists: math-verify reads `(2,12) \\cup (12,102), \\frac{1}{4}` as just 1/4, so a list of
    candidates can pass for a single gold; an answer that is a list (`is_list`) only counts against
    a gold that is a list too.
"""

from __future__ import annotations

import re

_PHANTOMS = ("\\phantom{", "\\hphantom{", "\\vphantom{")
_CANDIDATE_JOINERS = ("\\lor", "\\vee")
_OPENERS, _CLOSERS = "([{", ")]}"
_LIST_WORD = re.compile(r"(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])")


def has_non_ascii_digits(text: str) -> bool:
    """True if `text` holds a numeric character other than 0-9 (fullwidth, Arabic-Indic, bold ...).

    >>> has_non_ascii_digits("72"), has_non_ascii_digits("\\uff17\\uff12"), has_non_ascii_digits("x\\u00b2")
    (False, True, True)
    """
    return any(ch.isnumeric() for ch in text if ch > "\x7f")


def strip_phantoms(latex: str) -> str:
    """Remove `\\phantom{...}` (and `\\hphantom`, `\\vphantom`) groups, braces balanced; linear time.

    >>> strip_phantoms("\\\\phantom{72}73"), strip_phantoms("a\\\\hphantom{{x}}b")
    ('73', 'ab')
    """
    if "phantom{" not in latex:
        return latex
    out: list[str] = []
    i, n = 0, len(latex)
    while i < n:
        opener = next((p for p in _PHANTOMS if latex.startswith(p, i)), None)
        if opener is None:
            out.append(latex[i])
            i += 1
            continue
        depth, j = 1, i + len(opener)
        while j < n and depth:
            depth += {"{": 1, "}": -1}.get(latex[j], 0)
            j += 1
        i = j  # an unclosed phantom swallows the rest: it would not render either
    return "".join(out)


def lists_candidates(latex: str) -> bool:
    """True if the answer joins alternatives with a logical or (`73 \\lor 72`).

    >>> lists_candidates("73 \\\\lor 72"), lists_candidates("\\\\frac{1}{2}")
    (True, False)
    """
    return any(j in latex for j in _CANDIDATE_JOINERS)


def is_list(latex: str) -> bool:
    """True if the answer is several items: a comma or semicolon outside all brackets (not a
    thousands/decimal comma between digits, nor LaTeX's `,\\!`), or the word "or"/"and".

    >>> [is_list(s) for s in ("1, 2", "(3, \\\\frac{\\\\pi}{2})", "1,000", "32,\\\\!348", "3 \\\\text{ or } 4", "x^2")]
    [True, False, False, False, True, False]
    """
    if _LIST_WORD.search(latex):
        return True
    depth = 0
    for i, ch in enumerate(latex):
        if ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth = max(0, depth - 1)  # intervals like [2, 5) close with another bracket kind
        elif ch in ",;" and depth == 0:
            before, after = latex[i - 1 : i], latex[i + 1 : i + 3]
            if ch == "," and before.isdigit() and (after[:1].isdigit() or after == "\\!"):
                continue
            return True
    return False
