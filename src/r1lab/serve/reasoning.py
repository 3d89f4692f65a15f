"""Splitting a completion into `reasoning_content` and `content`, whole or while it streams.

The rule is DeepSeek's API behaviour, decided left to right so that a stream and the finished text
always split the same way: the completion is reasoning from a leading `<think>` (or from its first
character, when the chat template ends the prompt with `<think>`, as DeepSeek-R1's does) up to the
first `</think>`; everything after that is content. A completion that does not open with `<think>`
is all content, and nothing the model wrote is dropped. The tags themselves are never sent; a tag
split across deltas (`"</th"` + `"ink>"`) is held back until it is complete or proven not to be one.

For what a model trained on the template writes (one think block at the start) this is exactly
`r1lab.chat.split_think`, the parser the graders use; it differs only on malformed text, where the
grader is strict (text before `<think>` ignored, a re-opened block cut) and the server shows all.

Reasoning tokens are counted by position: a completion token is a reasoning token if its text ends
at or before the end of the think block.
"""

from __future__ import annotations

from bisect import bisect_right

from r1lab.chat import THINK_CLOSE, THINK_OPEN


def prompt_opens_think(prompt_text: str) -> bool:
    """True when a chat template ends the prompt inside a think block (DeepSeek-R1's does).

    >>> prompt_opens_think("<|assistant|><think>\\n")
    True
    """
    return prompt_text.rstrip().endswith(THINK_OPEN)


def split_completion(text: str, think_in_prompt: bool = False) -> tuple[str | None, str, int]:
    """`(reasoning or None, content, think_end)` for a finished completion: `ThinkSplitter` run over it.

    `think_end` is the character offset where the think block (with its closing tag) ends, 0 if
    there is none. Whitespace between `</think>` and the answer is dropped.

    >>> split_completion("<think>2+2=4</think> 4")
    ('2+2=4', '4', 20)
    >>> split_completion("plain answer")
    (None, 'plain answer', 0)
    """
    splitter = ThinkSplitter(think_in_prompt)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    reasoning = r1 + r2 if splitter.opened else None
    return reasoning, c1 + c2, splitter.think_end


def count_reasoning_tokens(token_ends: list[int], think_end: int) -> int:
    """How many tokens end at or before `think_end`; `token_ends` is each token's cumulative text length.

    >>> count_reasoning_tokens([1, 3, 7, 9], 7)
    3
    """
    return bisect_right(token_ends, think_end)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """Incremental split of streamed text into (reasoning_delta, content_delta).

    >>> s = ThinkSplitter()
    >>> [s.feed(d) for d in ["<thi", "nk>a+b", "</th", "ink> c"]]
    [('', ''), ('a+b', ''), ('', ''), ('', 'c')]
    >>> s.think_end
    18
    """

    def __init__(self, think_in_prompt: bool = False):
        self.state = "reasoning" if think_in_prompt else "start"
        self.buf = ""  # text received but not yet emitted (a possible partial tag)
        self.seen = 0  # characters received so far
        self.think_end = 0  # offset just past `</think>`, or of the end while still reasoning
        self._strip_lead = False  # drop whitespace between `</think>` and the first content

    def feed(self, delta: str) -> tuple[str, str]:
        self.seen += len(delta)
        self.buf += delta
        reasoning, content = "", ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buf = "reasoning", head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head):
                return "", ""  # still could be `<think>`: wait for more
            else:
                self.state = "content"
        if self.state == "reasoning":
            close = self.buf.find(THINK_CLOSE)
            if close >= 0:
                reasoning = self.buf[:close]
                self.buf = self.buf[close + len(THINK_CLOSE) :]
                self.think_end = self.seen - len(self.buf)
                self.state, self._strip_lead = "content", True
            else:
                keep = _partial_suffix(self.buf, THINK_CLOSE)
                reasoning, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                self.think_end = self.seen
                return reasoning, ""
        if self.state == "content":
            content, self.buf = self.buf, ""
            if self._strip_lead:
                content = content.lstrip()
                self._strip_lead = not content
        return reasoning, content

    @property
    def opened(self) -> bool:
        """Whether the completion has a think block (open or closed)."""
        return self.state == "reasoning" or self.think_end > 0

    def flush(self) -> tuple[str, str]:
        """Release what is held back once the stream has ended."""
        held, self.buf = self.buf, ""
        if self.state == "reasoning":
            self.think_end = self.seen
            return held, ""
        return "", held.lstrip() if self._strip_lead else held
