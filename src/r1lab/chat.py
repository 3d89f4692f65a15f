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

Extraction (`extract_answer`), on the answer text only, first rule that finds something wins:
  1. the last complete `<answer> ... </answer>` pair;
  2. `\\boxed{...}` (or `\\fbox{...}`), outermost only, braces balanced; if several boxes hold
     *different* answers the result is ambiguous and no answer is extracted;
  3. an explicit final phrase on a line: "final answer is", "the answer is", "answer:" or "####";
     the last such phrase, up to the end of its line;
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
    answer_text = text[close + len(THINK_CLOSE):]
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
    """Contents of the outermost `\\boxed{...}`/`\\fbox{...}` groups, in order; one linear pass."""
    starts: set[int] = set()  # index of the '{' that opens a box
    for opener in _BOX_OPENERS:
        i = text.find(opener)
        while i >= 0:
            starts.add(i + len(opener) - 1)
            i = text.find(opener, i + 1)
    if not starts:
        return []
    out: list[str] = []
    stack: list[int] = []
    open_box = -1  # position of the '{' of the box we are inside, -1 if none
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
            if open_box < 0 and i in starts:
                open_box = i
        elif ch == "}" and stack:
            j = stack.pop()
            if j == open_box:
                out.append(text[j + 1 : i])
                open_box = -1
    return out


def _last_tag(text: str, open_tag: str, close_tag: str) -> str | None:
    end = text.rfind(close_tag)
    if end < 0:
        return None
    start = text.rfind(open_tag, 0, end)
    if start < 0:
        return None
    return text[start + len(open_tag) : end]


def _phrase_answer(text: str) -> str | None:
    lower = text.lower()
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
    return line.strip().rstrip(".").strip().strip("$").strip() or None


def _normalise(ans: str) -> str:
    return " ".join(ans.split())


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
    """
    tagged = _last_tag(answer_text, ANSWER_OPEN, ANSWER_CLOSE)
    if tagged is not None:
        ans, source = tagged.strip(), "answer_tag"
        boxed_inside = _boxed_contents(ans)
        if len({_normalise(b) for b in boxed_inside}) == 1:
            ans = boxed_inside[0].strip()
    else:
        boxes = _boxed_contents(answer_text)
        if boxes:
            distinct = {_normalise(b) for b in boxes}
            if len(distinct) > 1:
                return None, "ambiguous"
            ans, source = boxes[-1].strip(), "boxed"
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
