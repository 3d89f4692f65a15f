"""Emergence metrics: what R1-Zero watched grow during RL, computed from completions.

- response length (tokens): mean and max; R1-Zero's reasoning got longer as RL went on;
- reflection-word rate: the fraction of completions that contain at least one reflection phrase
  ("wait", "check", "verify", "let me", "again", ...), the "aha moment" signal, matched as whole
  words, case-insensitively, in the completion text;
- reflection words per 1k tokens, for runs whose completions are long;
- format rate and accuracy come from the rewards' parts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_REFLECTION_WORDS: tuple[str, ...] = (
    "wait",
    "check",
    "recheck",
    "verify",
    "let me",
    "again",
    "hmm",
    "re-examine",
    "double-check",
)


def _pattern(words: Sequence[str]) -> re.Pattern[str]:
    # Alternation of escaped literals between word boundaries: linear time, no nested quantifiers.
    alts = "|".join(re.escape(w.lower()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b(?:{alts})\b")


def reflection_counts(texts: Sequence[str], words: Sequence[str] = DEFAULT_REFLECTION_WORDS) -> list[int]:
    """Number of reflection phrases in each text.

    >>> reflection_counts(["Wait, let me check.", "7+1=8"])
    [3, 0]
    """
    if not words:
        return [0] * len(texts)
    pat = _pattern(words)
    return [len(pat.findall(t.lower())) for t in texts]


def emergence_stats(
    texts: Sequence[str],
    lengths: Sequence[int],
    words: Sequence[str] = DEFAULT_REFLECTION_WORDS,
) -> dict[str, float]:
    """Length and reflection statistics of a batch of completions.

    >>> s = emergence_stats(["wait, check: 8", "8"], [5, 1])
    >>> (s["response_len_mean"], s["response_len_max"], s["reflection_rate"])
    (3.0, 5, 0.5)
    """
    if not texts:
        return {
            "response_len_mean": 0.0,
            "response_len_max": 0,
            "reflection_rate": 0.0,
            "reflection_per_1k": 0.0,
        }
    counts = reflection_counts(texts, words)
    total_tokens = max(1, sum(lengths))
    return {
        "response_len_mean": sum(lengths) / len(lengths),
        "response_len_max": max(lengths),
        "reflection_rate": sum(1 for c in counts if c > 0) / len(texts),
        "reflection_per_1k": 1000.0 * sum(counts) / total_tokens,
    }
