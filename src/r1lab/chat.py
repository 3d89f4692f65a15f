"""The one prompt template and the one parser of reasoning and final answers.

DeepSeek-R1 asks the model to reason inside `<think> ... </think>` and then give the answer. Every
stage (rewards, RL, evaluation, serving) splits a completion with `split_think` and extracts the
final answer with `extract_answer`, so a format or grading rule changes in one place only.

Splitting (`split_think`):
  * `<think>` ... `</think>`: reasoning is what lies between the first `<think>` and the *last*
    `</think>`; the answer text is what follows that last `</think>`.
  * `<think>` never closed: the completion is all reasoning and has no answer text (the answer must
    be outside the think block; an answer hidden inside it does not count).
  * no tags at all: no reasoning; the whole completion is answer text.
  * a `<think>` re-opened after the last `</think>` starts a new, unclosed think block: the answer
    text stops there.

Extraction (`extract_answer`), on the answer text only, first rule that finds something wins:
  1. `<answer> ... </answer>` pairs (a box inside is unwrapped); if complete pairs hold *different*
     answers (or there are more than `MAX_BOXES`) the result is ambiguous;
  2. `\\boxed{...}` (or `\\fbox{...}`), outermost only, braces balanced; if several boxes hold
     *different* answers (or there are more than `MAX_BOXES`) the result is ambiguous and no
     answer is extracted;
  3. an explicit final phrase on a line: "final answer is", "the answer is", "answer:" or "####"
     (ASCII case-insensitive); the last such phrase, up to the end of its line, without the `$`
     and markdown `*` around it and without a trailing period;
  4. the last non-empty line, if it is short (at most `MAX_ANSWER_CHARS`).
An extracted answer longer than `MAX_ANSWER_CHARS` is rejected (None): no verifier should spend
seconds parsing a megabyte of "answer". Everything is plain string scanning: linear time, no regex
that can backtrack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
MAX_ANSWER_CHARS = 512
MAX_BOXES = 32

#: The R1-Zero system prompt (DeepSeek-R1 report, Table 1), adapted to boxed answers.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process is enclosed within <think> </think> tags, and the final answer "
    "comes after it, written as \\boxed{answer}, i.e., <think> reasoning process here </think> "
    "answer here \\boxed{answer}."
)

_PHRASES = ("final answer is", "the answer is", "answer:", "####")
_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_BRACE_RE = re.compile("[{}]")
_OPENS_WITH_THINK = re.compile(r"\s*" + re.escape(THINK_OPEN))  # without copying text.lstrip()
# For text whose lower-cased copy changes length ("İ".lower() is two characters), indices found in
# the copy would be wrong, so the phrases are matched in place. A literal alternation cannot
# backtrack: the scan is linear.
_PHRASE_RE = re.compile("|".join(re.escape(p) for p in _PHRASES), re.IGNORECASE | re.ASCII)


def r1_messages(question: str, system: bool = True) -> list[dict[str, str]]:
    """Chat messages for one problem in the R1 template (system prompt + user turn).

    >>> r1_messages("1+1?", system=False)
    [{'role': 'user', 'content': '1+1?'}]
    """
    msgs = [{"role": "system", "content": R1_SYSTEM_PROMPT}] if system else []
    msgs.append({"role": "user", "content": question})
    return msgs


@dataclass(frozen=True)
class Parsed:
    """A completion split into reasoning and answer, with the extracted final answer."""

    reasoning: str  # text inside the think block ("" if none)
    answer_text: str  # text after the think block: what a user is shown as the answer
    answer: str | None  # extracted final answer, None if none or ambiguous
    source: str  # which rule found it: answer_tag, boxed, phrase, last_line, ambiguous, too_long, none
    well_formed: bool  # exactly one <think> at the start, one </think> after it, a non-empty answer


def split_think(text: str, think_in_prompt: bool = False) -> tuple[str, str, bool]:
    """Split a completion into (reasoning, answer_text, well_formed).

    `think_in_prompt` is for templates (like DeepSeek-R1's) whose prompt already ends in `<think>`,
    so the completion starts inside the think block.

    >>> split_think("<think>2+2=4</think> 4")
    ('2+2=4', ' 4', True)
    >>> split_think("<think>never closed 4")
    ('never closed 4', '', False)
    >>> split_think("just 4")
    ('', 'just 4', False)
    >>> split_think("<think>a</think> 4 <think>on second thought 5")
    ('a', ' 4 ', False)
    """
    n_open = text.count(THINK_OPEN)
    close = text.rfind(THINK_CLOSE)
    if close < 0:
        if n_open == 0 and not think_in_prompt:
            return "", text, False
        start = text.find(THINK_OPEN)
        start = 0 if start < 0 else start + len(THINK_OPEN)
        return text[start:], "", False
    first_open = text.find(THINK_OPEN)
    start = first_open + len(THINK_OPEN) if 0 <= first_open < close else 0
    reasoning = text[start:close]
    answer_text = text[close + len(THINK_CLOSE) :]
    reopened = answer_text.find(THINK_OPEN)
    if reopened >= 0:  # an unclosed think block after the answer: what follows is not answer text
        answer_text = answer_text[:reopened]
    expected_open = 0 if think_in_prompt else 1
    opens_at_start = think_in_prompt or _OPENS_WITH_THINK.match(text) is not None
    well_formed = (
        n_open == expected_open
        and text.count(THINK_CLOSE) == 1
        and opens_at_start
        and bool(answer_text.strip())
    )
    return reasoning, answer_text, well_formed


def _boxed_contents(text: str) -> list[str]:
    """Contents of the outermost `\\boxed{...}`/`\\fbox{...}` groups, in order, braces balanced.

    A box never closed ends the search (it would swallow the rest). A box whose content runs past
    `MAX_ANSWER_CHARS` is returned cut just beyond that length (so it is rejected as too long) and
    also ends the search: no scan ever walks a megabyte of braces, and the whole pass is linear.
    At most `MAX_BOXES + 1` boxes are returned: more than `MAX_BOXES` is not an answer but a list.

    >>> _boxed_contents("\\\\boxed{\\\\frac{1}{2}} and \\\\fbox{3}")
    ['\\\\frac{1}{2}', '3']
    >>> _boxed_contents("\\\\boxed{1} \\\\boxed{2")
    ['1']
    """
    out: list[str] = []
    # Next occurrence of each opener; each only moves forward, so finding boxes is linear overall.
    next_at = {opener: text.find(opener) for opener in _BOX_OPENERS}
    pos = 0
    while True:
        for opener, at in next_at.items():
            if 0 <= at < pos:
                next_at[opener] = text.find(opener, pos)
        found = [(at, opener) for opener, at in next_at.items() if at >= 0]
        if not found or len(out) > MAX_BOXES:
            return out
        at, opener = min(found)
        brace = at + len(opener) - 1
        limit = brace + MAX_ANSWER_CHARS + 2
        close = _matching_brace(text, brace, limit)
        if close < 0:
            if limit < len(text):  # still open after MAX_ANSWER_CHARS: too long to be an answer
                out.append(text[brace + 1 : limit])
            return out
        out.append(text[brace + 1 : close])
        pos = close + 1


def _matching_brace(text: str, start: int, stop: int) -> int:
    """Index of the '}' that closes the '{' at `start`, looking only before `stop`; -1 if none."""
    depth = 0
    for m in _BRACE_RE.finditer(text, start, stop):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.start()
    return -1


def _tag_contents(text: str, open_tag: str, close_tag: str) -> list[str]:
    """Contents of the complete `open_tag ... close_tag` pairs, in order (non-nested, linear).

    Like boxes, at most `MAX_BOXES + 1` pairs are returned.
    """
    out: list[str] = []
    start = text.find(open_tag)
    while start >= 0 and len(out) <= MAX_BOXES:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break
        # A later opener before this closer means the earlier one was never closed.
        inner_start = text.rfind(open_tag, start, end) + len(open_tag)
        out.append(text[inner_start:end])
        start = text.find(open_tag, end + len(close_tag))
    return out


def _last_phrase_end(text: str) -> int:
    """Index just after the last final-answer phrase, -1 if none (ASCII case-insensitive)."""
    lower = text.lower()
    # Lower-casing never shrinks a character, so equal lengths mean the indices still line up;
    # rfind on that copy is far faster than a regex scan over megabytes.
    if len(lower) == len(text):
        best = max(((lower.rfind(p), len(p)) for p in _PHRASES), key=lambda x: x[0])
        return best[0] + best[1] if best[0] >= 0 else -1
    last = None
    for last in _PHRASE_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    return last.end() if last is not None else -1


def _phrase_answer(text: str) -> str | None:
    end = _last_phrase_end(text)
    if end < 0:
        return None
    rest = text[end:]
    line_end = rest.find("\n")
    line = rest if line_end < 0 else rest[:line_end]
    return line.strip().strip("*").strip().rstrip(".").strip().strip("$").strip() or None


def _last_line(text: str) -> str | None:
    """The last non-empty line, stripped; splits only a short tail, not a megabyte of text."""
    stripped = text.strip()
    if not stripped:
        return None
    tail = stripped[-4 * MAX_ANSWER_CHARS :]
    lines = tail.splitlines()
    if len(lines) == 1 and len(tail) < len(stripped):  # the last line is longer than the tail
        lines = stripped.splitlines()
    return lines[-1].strip()


def _normalise(ans: str) -> str:
    return " ".join(ans.split())


def _single(candidates: list[str]) -> str | None:
    """The one answer the candidates agree on (whitespace aside), or None if they disagree."""
    distinct = {_normalise(c) for c in candidates}
    return candidates[-1].strip() if len(distinct) == 1 else None


def extract_answer(answer_text: str) -> tuple[str | None, str]:
    """Final answer from the answer text, and the rule that found it (see the module docstring).

    >>> extract_answer("so \\\\boxed{\\\\frac{1}{2}}.")
    ('\\\\frac{1}{2}', 'boxed')
    >>> extract_answer("\\\\boxed{3} or \\\\boxed{4}")
    (None, 'ambiguous')
    >>> extract_answer("The answer is 72.")
    ('72', 'phrase')
    >>> extract_answer("\\n7301\\n")
    ('7301', 'last_line')
    >>> extract_answer("<answer> (1 + 2) * 3 </answer>")
    ('(1 + 2) * 3', 'answer_tag')
    """
    tagged = _tag_contents(answer_text, ANSWER_OPEN, ANSWER_CLOSE)
    if tagged:
        ans, source = _single(tagged), "answer_tag"
        if ans is None or len(tagged) > MAX_BOXES:
            return None, "ambiguous"
        boxed_inside = _boxed_contents(ans)
        if boxed_inside:
            ans = _single(boxed_inside)
            if ans is None:
                return None, "ambiguous"
    else:
        boxes = _boxed_contents(answer_text)
        if boxes:
            ans, source = _single(boxes), "boxed"
            if ans is None or len(boxes) > MAX_BOXES:
                return None, "ambiguous"
        else:
            phrase = _phrase_answer(answer_text)
            if phrase is not None:
                ans, source = phrase, "phrase"
            else:
                line = _last_line(answer_text)
                if line is None:
                    return None, "none"
                ans, source = line, "last_line"
    if not ans:
        return None, "none"
    if len(ans) > MAX_ANSWER_CHARS:
        return None, "too_long"
    return ans, source


def parse(text: str, think_in_prompt: bool = False) -> Parsed:
    """Split a completion and extract its final answer (the one parser every stage uses).

    >>> p = parse("<think>7+5=12, carry 1</think>\\n\\\\boxed{12}")
    >>> (p.answer, p.source, p.well_formed)
    ('12', 'boxed', True)
    >>> parse("<think>the answer is 12 but I stopped").answer is None
    True
    """
    reasoning, answer_text, well_formed = split_think(text, think_in_prompt)
    answer, source = extract_answer(answer_text)
    return Parsed(reasoning, answer_text, answer, source, well_formed)
