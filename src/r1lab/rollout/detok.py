"""Incremental detokenization with stop strings: the text a streaming client may be shown, token by token.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a token's leading space depends on its left neighbour). `TextStream` keeps a short
window of ids and emits the part of `decode(window)` that grew since the previous token (the
prefix/read-offset scheme of vLLM's and HF's streamers), holding back a trailing U+FFFD that means
"more bytes to come".

Stop strings: the stream finds the earliest occurrence of any stop string in the text and cuts the
text there. Until a stop is found it holds back the longest tail that could be the start of one (so
a client never sees "</ans" of a stop "</answer>"); `flush()` releases the held text when the
sequence ends for another reason (EOS, length).

Token ids listed in `skip` (special tokens such as EOS or pad) carry no text.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Text of one growing completion. `push(token)` returns the newly safe text (possibly "")."""

    def __init__(self, decode: Callable[[list[int]], str], skip: frozenset[int], stops: tuple[str, ...]):
        self._decode = decode
        self._skip = skip
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._ids: list[int] = []  # text-bearing ids only
        self._prefix = 0  # window start: ids before it are final text
        self._read = 0  # ids before it are already in `text`
        self.text = ""  # decoded text so far (cut at the stop string once one is found)
        self.sent = 0  # characters of `text` already returned
        self.stop_at: int | None = None  # where the stop string began, once found

    def push(self, token_id: int) -> str:
        if token_id in self._skip or self.stop_at is not None:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        old_len = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self._stops:
            hit = self._find_stop(old_len)
            if hit is not None:
                self.stop_at = hit
                self.text = self.text[:hit]
                return self.flush()
            end = len(self.text) - self._held()
        else:
            end = len(self.text)
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

    def flush(self) -> str:
        """Release everything not yet returned (the sequence has ended)."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _find_stop(self, old_len: int) -> int | None:
        """Earliest start of a stop string that ends in the new text."""
        best = None
        for s in self._stops:
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
