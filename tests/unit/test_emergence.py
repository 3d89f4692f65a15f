"""Emergence metrics (`r1lab.metrics.emergence`): reflection phrases as whole words, and batch stats.

The reflection-word rate is the "aha moment" curve of every RL run, so what counts as a match is
pinned down here: whole words and phrases, any case, never a fragment of a longer word.
"""

from __future__ import annotations

import math

import pytest

from r1lab.metrics.emergence import DEFAULT_REFLECTION_WORDS, emergence_stats, reflection_counts


@pytest.mark.parametrize(
    "text, count",
    [
        ("Wait, let me check.", 3),
        ("WAIT. Let Me recheck it AGAIN", 4),  # any case; "recheck" is one word, not "check" too
        ("hmm... wait? wait!", 3),
        ("let me\nthink", 1),
        ("double-check: 7+1=8", 1),  # the hyphenated phrase is one match, not "check" as well
        ("re-examine the sum", 1),
        ("7+1=8", 0),
    ],
)
def test_reflection_phrases_are_counted(text, count):
    assert reflection_counts([text]) == [count]


@pytest.mark.parametrize(
    "text",
    [
        "waiting for the awaited checkout",  # fragments of longer words
        "a checked, verified, rechecked sum",  # inflections are other words
        "hmmm",
        "letme",
        "outlet meter",  # "let me" must start and end on word boundaries
        "gain",
    ],
)
def test_fragments_of_other_words_do_not_count(text):
    assert reflection_counts([text]) == [0]


def test_counts_are_per_text_in_order():
    assert reflection_counts(["wait", "", "verify and verify", "no"]) == [1, 0, 2, 0]


def test_custom_words_replace_the_defaults_and_are_literal():
    assert reflection_counts(["Aha! a.b aXb", "wait"], words=["aha", "a.b"]) == [
        2,
        0,
    ]  # '.' is not a wildcard
    assert reflection_counts(["wait, check"], words=[]) == [0]
    assert reflection_counts([], words=["wait"]) == []


def test_default_words_include_the_r1_phrases():
    assert {"wait", "check", "verify", "let me", "again"} <= set(DEFAULT_REFLECTION_WORDS)


def test_emergence_stats_hand_values():
    texts = ["Wait, let me check: 8", "8", "verify 12", "hmm"]
    lengths = [20, 1, 9, 10]
    stats = emergence_stats(texts, lengths)
    assert stats["response_len_mean"] == pytest.approx(10.0)  # 40 / 4
    assert stats["response_len_max"] == 20
    assert stats["reflection_rate"] == pytest.approx(0.75)  # 3 of 4 texts reflect
    assert stats["reflection_per_1k"] == pytest.approx(1000 * 5 / 40)  # 3 + 0 + 1 + 1 phrases


def test_emergence_stats_with_custom_words():
    stats = emergence_stats(["aha 1", "2"], [4, 4], words=["aha"])
    assert stats["reflection_rate"] == 0.5 and stats["reflection_per_1k"] == pytest.approx(125.0)


def test_emergence_stats_of_nothing_are_zeros():
    assert emergence_stats([], []) == {
        "response_len_mean": 0.0,
        "response_len_max": 0,
        "reflection_rate": 0.0,
        "reflection_per_1k": 0.0,
    }


def test_zero_length_completions_do_not_divide_by_zero():
    stats = emergence_stats(["wait", ""], [0, 0])
    assert stats["response_len_mean"] == 0.0 and stats["reflection_rate"] == 0.5
    assert math.isfinite(stats["reflection_per_1k"])
