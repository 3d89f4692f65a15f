"""The one parser of completions: think blocks, final-answer extraction, and its cost on huge inputs."""

import doctest

import pytest

from r1lab import chat
from r1lab.chat import MAX_ANSWER_CHARS, MAX_BOXES, extract_answer, parse, r1_messages, split_think


def test_doctests():
    assert doctest.testmod(chat).failed == 0


# --------------------------------------------------------------------------- split_think


@pytest.mark.parametrize(
    "text, reasoning, answer_text, well_formed",
    [
        ("<think>r</think> a", "r", " a", True),
        ("  \n<think>r</think>a", "r", "a", True),  # leading whitespace is fine
        ("<think>r</think>", "r", "", False),  # no answer after the block
        ("<think>r</think>   \n", "r", "   \n", False),  # only whitespace after it
        ("<think>never closed a", "never closed a", "", False),
        ("r</think> a", "r", " a", False),  # missing <think>
        ("a <think>r</think> b", "r", " b", False),  # text before <think>
        ("<think>r1</think> x <think>r2</think> a", "r1</think> x <think>r2", " a", False),  # repeated
        ("<think><think>r</think> a", "<think>r", " a", False),  # <think> twice
        ("<think>r</think> a <think>more", "r", " a ", False),  # re-opened: the rest is reasoning
        ("plain answer", "", "plain answer", False),
        ("", "", "", False),
    ],
)
def test_split_think(text, reasoning, answer_text, well_formed):
    assert split_think(text) == (reasoning, answer_text, well_formed)


def test_split_think_when_prompt_ends_in_think():
    assert split_think("r</think> a", think_in_prompt=True) == ("r", " a", True)
    assert split_think("<think>r</think> a", think_in_prompt=True)[2] is False  # a second <think>
    assert split_think("still thinking", think_in_prompt=True) == ("still thinking", "", False)


def test_unicode_survives_splitting_and_extraction():
    text = "<think>π ≈ 3.14159 — naïve 数学 🙂</think>\nLa réponse est \\boxed{\\pi} ✓"
    p = parse(text)
    assert p.reasoning == "π ≈ 3.14159 — naïve 数学 🙂"
    assert p.answer == "\\pi" and p.well_formed


# --------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    "answer_text, answer, source",
    [
        ("so \\boxed{12}.", "12", "boxed"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
        ("\\boxed{ 12 } and again \\boxed{12}", "12", "boxed"),  # the same answer twice is fine
        ("\\boxed{3} or \\boxed{4}", None, "ambiguous"),
        ("\\fbox{7}", "7", "boxed"),
        ("\\boxed{\\boxed{5}}", "\\boxed{5}", "boxed"),  # outermost only
        ("\\boxed{5", "\\boxed{5", "last_line"),  # never closed: not a box (verifiers reject it)
        ("\\boxed{}", None, "none"),
        ("\\boxed{} \\boxed{7}", None, "ambiguous"),
        ("<answer> 1 + 2 </answer>", "1 + 2", "answer_tag"),
        ("<answer>\\boxed{9}</answer>", "9", "answer_tag"),  # a box inside the tag is unwrapped
        ("<answer>\\boxed{1} \\boxed{2}</answer>", None, "ambiguous"),
        ("<answer>1</answer> then <answer>2</answer>", None, "ambiguous"),
        ("<answer>3</answer> <answer>3</answer>", "3", "answer_tag"),
        ("<answer> </answer>", None, "none"),
        ("The answer is 72.", "72", "phrase"),
        ("THE ANSWER IS 72", "72", "phrase"),
        ("**Final answer:** $72$.", "72", "phrase"),
        ("Answer: 3\nThe answer is 4\nwait", "4", "phrase"),  # the last phrase wins
        ("#### 1,000", "1,000", "phrase"),
        ("İİİ the answer is 7", "7", "phrase"),  # "İ".lower() is two characters: indices must hold
        ("\n\n7301\n", "7301", "last_line"),
        ("", None, "none"),
        ("x" * (MAX_ANSWER_CHARS + 1), None, "too_long"),
        ("\\boxed{" + "9" * 10_000 + "}", None, "too_long"),
        ("The answer is " + "9" * 10_000, None, "too_long"),
    ],
)
def test_extract_answer(answer_text, answer, source):
    assert extract_answer(answer_text) == (answer, source)


def test_too_many_boxes_is_a_list_not_an_answer():
    assert extract_answer("\\boxed{1} " * MAX_BOXES) == ("1", "boxed")
    assert extract_answer("\\boxed{1} " * (MAX_BOXES + 1)) == (None, "ambiguous")
    assert extract_answer("<answer>1</answer>" * (MAX_BOXES + 1)) == (None, "ambiguous")


def test_answer_hidden_in_reasoning_does_not_count():
    assert parse("<think>\\boxed{42}</think>").answer is None
    assert parse("<think>The answer is 42").answer is None
    assert parse("<think>\\boxed{42}</think> I am not sure.").answer == "I am not sure."


def test_r1_messages():
    msgs = r1_messages("What is 2+2?")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "<think>" in msgs[0]["content"] and msgs[1]["content"] == "What is 2+2?"


# --------------------------------------------------------------------------- huge inputs finish

MB = 1_000_000


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "<think>" + "a " * (n // 2) + "</think>" + "b " * (n // 2) + "\\boxed{7}",
        lambda n: "x" * n,
        lambda n: "é" * n,  # non-ASCII: the phrase search takes its other path
        lambda n: "{" * (n // 2) + "}" * (n // 2),
        lambda n: "\\boxed{" * (n // 7),  # a million unclosed boxes
        lambda n: "\\boxed{1}" * (n // 9),  # far more boxes than MAX_BOXES
        lambda n: "}" * n + "\\boxed{1}",
        lambda n: "\\boxed{" + "{}" * (n // 2) + "}",  # one box of a megabyte of braces
        lambda n: "<answer>" * (n // 8) + "</answer>",
        lambda n: "</answer><answer>" * (n // 17),
        lambda n: "<think>" * (n // 7),
        lambda n: "</think>" * (n // 8),
        lambda n: "the answer is " * (n // 14),
        lambda n: "\n" * n + "7",
    ],
)
def test_megabyte_completions_parse_in_linear_time(make):
    # A quadratic step would take hours on these 1-4 MB inputs; the linear parser takes well under
    # a second each. No timing assert (CI machines vary): finishing at all is the check.
    for n in (1 * MB, 4 * MB):
        p = parse(make(n))
        assert p.answer is None or len(p.answer) <= MAX_ANSWER_CHARS
