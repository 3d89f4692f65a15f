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
     answers the result is ambiguous and no answer is extracted;
  2. `\\boxed{...}` (or `\\fbox{...}`), outermost only, braces balanced; if several boxes hold
     *different* answers the result is ambiguous and no answer is extracted;
  3. an explicit final phrase on a line: "final answer is", "the answer is", "answer:" or "####"
     (ASCII case-insensitive); the last such phrase, up to the end of its line, without the `$`
     and markdown `*` around it and without a trailing period;
  4. the last non-empty line, if it is short (at most `MAX_ANSWER_CHARS`).
An extracted answer longer than `MAX_ANSWER_CHARS` is rejected (None): no verifier should spend
seconds parsing a megabyte of "answer". Everything is plain string scanning: linear time, no regex
that can backtrack.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
MAX_ANSWER_CHARS = 512

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
# Lower-casing with str.lower() can change a string's length ("İ" becomes two characters), which
# would shift every index found in the lowered copy; this table lowers ASCII letters only.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


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
    opens_at_start = think_in_prompt or text.lstrip().startswith(THINK_OPEN)
    well_formed = (
        n_open == expected_open
        and text.count(THINK_CLOSE) == 1
        and opens_at_start
        and bool(answer_text.strip())
    )
    return reasoning, answer_text, well_formed


def _boxed_contents(text: str) -> list[str]:
    """Contents of the outermost `\\boxed{...}`/`\\fbox{...}` groups, in order; one linear pass.

    >>> _boxed_contents("\\\\boxed{\\\\frac{1}{2}} and \\\\fbox{3}")
    ['\\\\frac{1}{2}', '3']
    """
    starts: set[int] = set()  # index of the '{' that opens a box
    for opener in _BOX_OPENERS:
        i = text.find(opener)
        while i >= 0:
            starts.add(i + len(opener) - 1)
            i = text.find(opener, i + 1)
    if not starts:
        return []
    out: list[str] = []
    depth = 0
    open_box = -1  # position of the '{' of the box we are inside, -1 if none
    box_depth = 0  # brace depth just inside that box
    # Visit only the braces (str.find is C-speed), not every character of a megabyte completion.
    i = _next_brace(text, 0)
    while i >= 0:
        if text[i] == "{":
            depth += 1
            if open_box < 0 and i in starts:
                open_box, box_depth = i, depth
        elif depth > 0:
            if open_box >= 0 and depth == box_depth:
                out.append(text[open_box + 1 : i])
                open_box = -1
            depth -= 1
        i = _next_brace(text, i + 1)
    return out


def _next_brace(text: str, start: int) -> int:
    """Index of the next '{' or '}' at or after `start`, -1 if none."""
    a, b = text.find("{", start), text.find("}", start)
    if a < 0:
        return b
    return a if b < 0 or a < b else b


def _tag_contents(text: str, open_tag: str, close_tag: str) -> list[str]:
    """Contents of the complete `open_tag ... close_tag` pairs, in order (non-nested, linear)."""
    out: list[str] = []
    start = text.find(open_tag)
    while start >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break
        # A later opener before this closer means the earlier one was never closed.
        inner_start = text.rfind(open_tag, start, end) + len(open_tag)
        out.append(text[inner_start:end])
        start = text.find(open_tag, end + len(close_tag))
    return out


def _phrase_answer(text: str) -> str | None:
    lower = text.translate(_ASCII_LOWER)
    best, best_len = -1, 0
    for phrase in _PHRASES:
        i = lower.rfind(phrase)
        if i > best:
            best, best_len = i, len(phrase)
    if best < 0:
        return None
    rest = text[best + best_len :]
    line_end = rest.find("\n")
    line = rest if line_end < 0 else rest[:line_end]
    return line.strip().strip("*").strip().rstrip(".").strip().strip("$").strip() or None


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
        if ans is None:
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
            if ans is None:
                return None, "ambiguous"
        else:
            phrase = _phrase_answer(answer_text)
            if phrase is not None:
                ans, source = phrase, "phrase"
            else:
                lines = [ln.strip() for ln in answer_text.strip().splitlines() if ln.strip()]
                if not lines:
                    return None, "none"
                ans, source = lines[-1], "last_line"
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
