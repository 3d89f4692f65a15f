"""Rule-based rewards: each verifier on harmless variants, adversarial ones, and the shipped test sets."""

import doctest
import json
import threading
from pathlib import Path

import pytest

import r1lab.rewards.countdown
import r1lab.rewards.grader
import r1lab.rewards.guards
import r1lab.rewards.math_equiv
import r1lab.rewards.numeric
from r1lab.config import R1labError, RewardSpec, TaskSpec
from r1lab.rewards import (
    Reward,
    countdown_reward,
    exact_reward,
    format_reward,
    grade,
    gsm8k_reward,
    math_equal,
    math_reward,
    overlong_penalty,
)
from r1lab.rewards.countdown import MAX_EQUATION_CHARS
from r1lab.tasks import load_task, solve_countdown
from r1lab.tasks.base import Problem

EQUIVALENCE = Path(__file__).parent.parent / "data" / "math_verify_equivalence.jsonl"


def _wrap(answer_text: str) -> str:
    return f"<think>working it out</think>\n{answer_text}"


def _problem(reference: str, verifier: str, **meta) -> Problem:
    return Problem("t/0", [{"role": "user", "content": "q"}], reference, {"verifier": verifier, **meta})


@pytest.mark.parametrize(
    "module",
    [
        r1lab.rewards.countdown,
        r1lab.rewards.grader,
        r1lab.rewards.guards,
        r1lab.rewards.math_equiv,
        r1lab.rewards.numeric,
    ],
)
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


# --------------------------------------------------------------------------- format and overlong


def test_format_reward():
    assert format_reward("<think>r</think> 4") == Reward(1.0, {"format": 1.0}, "4")
    for bad in (
        "4",
        "<think>r</think>",
        "<think>r",
        "<think>a</think><think>b</think> 4",
        "x <think>r</think> 4",
    ):
        assert format_reward(bad).score == 0.0, bad


def test_overlong_penalty_is_dapo_soft_punishment():
    assert [overlong_penalty(n, 100, 20, 0.5) for n in (0, 80, 85, 90, 100, 500)] == [
        0.0,
        0.0,
        -0.125,
        -0.25,
        -0.5,
        -0.5,
    ]
    assert overlong_penalty(10_000, 100, 0) == 0.0  # buffer 0: off


# --------------------------------------------------------------------------- gsm8k / exact


@pytest.mark.parametrize(
    "answer_text",
    [
        "The answer is 72",
        "\\boxed{72}",
        "The answer is 72.",
        "#### 72",
        "The answer is $72",
        "The answer is \\$72.00",
        "The answer is +72",
        "The answer is 72 dollars",
        "The answer is 72 eggs.",
        "The answer is 72%",
        "The answer is 72.0",
        "\\boxed{\\text{72 eggs}}",
        "Answer: **72**",
    ],
)
def test_gsm8k_accepts_harmless_forms(answer_text):
    assert gsm8k_reward(_wrap(answer_text), "72").score == 1.0


@pytest.mark.parametrize(
    "answer_text",
    [
        "The answer is 73",
        "The answer is 72 or 73",  # several candidates
        "The answer is 8 * 9 = 72",
        "\\boxed{72} \\boxed{73}",
        "The answer is -72",
        "The answer is 7.2",
        "The answer is ٧٢",  # Arabic-Indic digits: int() reads them as 72
        "The answer is ７２",  # fullwidth
        "The answer is 𝟕𝟐",  # mathematical bold
        "The answer is 7２",
        "\\boxed{\\phantom{72}}",  # renders as an empty box
        "The answer is seventy-two",
        "",
    ],
)
def test_gsm8k_rejects(answer_text):
    assert gsm8k_reward(_wrap(answer_text), "72").score == 0.0


def test_gsm8k_signs_decimals_and_thousands():
    assert gsm8k_reward(_wrap("The answer is -3"), "-3").score == 1.0
    assert gsm8k_reward(_wrap("The answer is 3"), "-3").score == 0.0
    assert gsm8k_reward(_wrap("The answer is −3"), "-3").score == 1.0  # U+2212 minus sign
    assert gsm8k_reward(_wrap("The answer is $1,000,000"), "1000000").score == 1.0
    assert gsm8k_reward(_wrap("The answer is 1,00"), "100").score == 0.0  # not a thousands group
    assert gsm8k_reward(_wrap("The answer is 0.5"), ".5").score == 1.0


def test_gsm8k_reference_must_be_a_number():
    with pytest.raises(R1labError, match="not a single number"):
        gsm8k_reward(_wrap("7"), "seven")


def test_exact_reward():
    assert exact_reward(_wrap("The answer is 15557"), "15557").score == 1.0
    assert exact_reward(_wrap("15557.0"), "15557").score == 1.0
    assert exact_reward(_wrap("15558"), "15557").score == 0.0
    assert exact_reward(_wrap("The answer is blue."), "blue").score == 1.0
    assert exact_reward(_wrap("The answer is Blue"), "blue").score == 0.0


@pytest.fixture(scope="module")
def gsm8k():
    return load_task(TaskSpec(name="gsm8k", split="test"))


def test_gsm8k_all_golds_accepted_and_all_off_by_one_rejected(gsm8k):
    assert len(gsm8k) == 1319
    boxed = sum(gsm8k_reward(_wrap(f"So \\boxed{{{p.reference}}}"), p.reference).score for p in gsm8k)
    phrase = sum(gsm8k_reward(_wrap(f"The answer is {p.reference}"), p.reference).score for p in gsm8k)
    plus_one = sum(
        gsm8k_reward(_wrap(f"\\boxed{{{int(p.reference) + 1}}}"), p.reference).score for p in gsm8k
    )
    assert (boxed, phrase, plus_one) == (1319, 1319, 0)


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "answer_text, reference",
    [
        ("\\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}"),
        ("The answer is 0.5", "\\frac{1}{2}"),
        ("The answer is $\\frac12$.", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{1, 2}", "2, 1"),  # a set answer against a set gold
        ("\\boxed{\\$32,348}", "\\$32,\\!348"),
        ("\\boxed{\\phantom{0}72}", "72"),  # a phantom is just space
    ],
)
def test_math_accepts_equivalent_answers(answer_text, reference):
    assert math_reward(_wrap(answer_text), reference).score == 1.0


@pytest.mark.parametrize(
    "answer_text",
    [
        "\\boxed{73}",
        "\\boxed{\\text{72}+1}",
        "\\boxed{\\phantom{72}}",  # an empty-looking box math-verify would read as 72
        "\\boxed{\\phantom{72}73}",
        "\\boxed{73 \\lor 72}",  # math-verify accepts a logical or of candidates
        "\\boxed{73 \\vee 72}",
        "\\boxed{(2,12) \\cup (12,102), 72}",  # math-verify reads this list as just its last item
        "The answer is 73 or 72",
        "\\boxed{73} \\boxed{72}",
        "\\boxed{73} \\quad \\text{(some say 72)}",
        "The answer is 73} \\boxed{72",  # unbalanced braces smuggling a second box
        "\\boxed{７２}",
        "\\boxed{𝟕𝟐}",
        "\\boxed{٧٢}",
        "\\boxed{}",
        "",
    ],
)
def test_math_rejects_tricks(answer_text):
    assert math_reward(_wrap(answer_text), "72").score == 0.0


def test_math_answer_only_in_reasoning_is_rejected():
    assert math_reward("<think>\\boxed{72}</think>", "72").score == 0.0
    assert math_reward("<think>so \\boxed{72}", "72").score == 0.0


def test_math_pathological_answer_times_out_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(r1lab.rewards.math_equiv, "TIMEOUT_S", 1)
    assert math_reward(_wrap("\\boxed{9^{9^{9^{9}}}}"), "72").score == 0.0


def test_math_reward_works_off_the_main_thread():
    # SIGALRM timeouts are main-thread only; elsewhere math-verify must run without them, not raise.
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward(_wrap("\\boxed{0.5}"), "\\frac{1}{2}").score))
    t.start()
    t.join(60)
    assert out == [1.0]


def _equivalence_rows():
    return [json.loads(line) for line in EQUIVALENCE.read_text(encoding="utf-8").splitlines() if line.strip()]


def _agrees(row) -> bool:
    got = math_equal(
        row["gold"],
        row["pred"],
        match_types=row["match_types"],
        precision=row["precision"],
        strict=row["strict"],
        allow_set_relation_comp=row["allow_set_relation_comp"],
    )
    return got == row["expected"]


def test_math_equal_agrees_with_math_verify_cases_sample():
    rows = _equivalence_rows()
    assert len(rows) == 270
    sample = rows[::15] + [r for r in rows if not r["expected"]][::4]
    assert [(r["gold"], r["pred"]) for r in sample if not _agrees(r)] == []


@pytest.mark.slow
def test_math_equal_agrees_with_math_verify_on_all_rows():
    rows = _equivalence_rows()
    assert [(r["gold"], r["pred"], r["expected"]) for r in rows if not _agrees(r)] == []


@pytest.fixture(scope="module")
def math500():
    return load_task(TaskSpec(name="math500", split="test"))


def _math500_rates(problems):
    golds = sum(math_reward(_wrap(f"\\boxed{{{p.reference}}}"), p.reference).score for p in problems)
    pairs = other_accepted = 0
    for p, q in zip(problems, problems[1:] + problems[:1], strict=True):
        a, b = f"\\boxed{{{p.reference}}}", f"\\boxed{{{q.reference}}}"
        if math_equal(a, b) or math_equal(b, a):
            continue  # the two answers are the same mathematically
        pairs += 1
        other_accepted += math_reward(_wrap(b), p.reference).score
    return golds, pairs, other_accepted


def test_math500_subset(math500):
    golds, pairs, other_accepted = _math500_rates(math500[:40])
    assert golds == 40 and pairs >= 38 and other_accepted == 0


@pytest.mark.slow
def test_math500_golds_accepted_and_other_answers_rejected(math500):
    golds, pairs, other_accepted = _math500_rates(math500)
    assert golds >= 499
    assert pairs >= 490 and other_accepted <= 0.01 * pairs


# --------------------------------------------------------------------------- countdown

NUMS, TARGET = [30, 71, 88, 2], 45


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("<answer>(88 - 71) + 30 - 2</answer>", True),
        ("<answer>88 - 71 + 30 - 2 = 45</answer>", True),
        ("<answer>$(88 - 71) \\times 1 + 30 - 2$</answer>", False),  # 1 is not given
        ("<answer>(88 − 71) + 30 − 2</answer>", True),  # Unicode minus
        ("<answer>88 - 71 + 30 - 2 = 46</answer>", False),  # claims another target
        ("<answer>88 - 71 + 30 - 2 = 45 = 45</answer>", False),
        ("<answer>88 - 71 + 30</answer>", False),  # omits 2 (and misses)
        ("<answer>88 - 71 + 30 - 2 + 2 - 2</answer>", False),  # reuses 2
        ("<answer>88 - 71 + 30 - 2 * 1</answer>", False),  # 1 not given
        ("<answer>88 - 71 + 30 - 2 + 30 / (2 - 2)</answer>", False),  # division by zero
        ("<answer>88 - 71 + 30 - -2</answer>", False),  # unary minus is not allowed
        ("<answer>88 - 71 + 30 - 2.0</answer>", False),
        ("<answer>88 ** 1 - 71 + 30 - 2</answer>", False),
        ("<answer>__import__('os').system('true')</answer>", False),
        ("<answer>((((88 - 71)))) + 30 - 2</answer>", True),
        ("<answer>" + "(" * 40 + "88" + ")" * 40 + " - 71 + 30 - 2</answer>", False),  # too deep
        ("<answer>88 - 71 + 30" + " " * MAX_EQUATION_CHARS + "- 2</answer>", False),  # too long
        ("<answer>(88 - 71) + 30 - 2</answer> <answer>88 + 71</answer>", False),  # two answers
        ("<answer>88 - 71 + 30 - ２</answer>", False),  # look-alike digit
    ],
)
def test_countdown_cases(answer, ok):
    assert countdown_reward(_wrap(answer), NUMS, TARGET).score == (1.0 if ok else 0.0)


def test_countdown_exact_fractions():
    assert countdown_reward(_wrap("<answer>(7 / 2) * 2</answer>"), [7, 2, 2], 7).score == 1.0
    assert countdown_reward(_wrap("<answer>7 / 3 * 3</answer>"), [7, 3, 3], 7).score == 1.0
    assert countdown_reward(_wrap("<answer>7 / 3 * 2</answer>"), [7, 3, 2], 4).score == 0.0


@pytest.mark.parametrize("task", ["countdown-hf", "countdown-tinyzero"])
def test_countdown_every_shipped_row(task):
    problems = load_task(TaskSpec(name=task, split="test"))
    assert len(problems) == 1024
    bad = {"solver": 0, "reuse": 0, "omit": 0, "foreign": 0, "miss": 0}
    for p in problems:
        nums, target = p.meta["nums"], p.meta["target"]
        eq = solve_countdown(nums, target)
        assert eq is not None, p.id

        def score(answer: str, nums=nums, target=target) -> float:
            return countdown_reward(_wrap(f"<answer>{answer}</answer>"), nums, target).score

        bad["solver"] += score(eq) != 1.0
        bad["reuse"] += score(f"{eq} + {nums[0]} - {nums[0]}") != 0.0
        bad["omit"] += score(" + ".join(map(str, nums[1:]))) != 0.0
        bad["foreign"] += score(f"({eq}) * 100 / 100") != 0.0
        bad["miss"] += score(f"({eq}) + {nums[0]} - {nums[0]} + {nums[0]} = {target}") != 0.0
    assert bad == {"solver": 0, "reuse": 0, "omit": 0, "foreign": 0, "miss": 0}


# --------------------------------------------------------------------------- grade


def test_grade_parts_weights_and_answer():
    p = _problem("72", "gsm8k")
    r = grade(_wrap("The answer is 72"), p, RewardSpec(accuracy_weight=2.0, format_weight=0.5))
    assert r == Reward(2.5, {"accuracy": 1.0, "format": 1.0}, "72")
    r = grade("The answer is 72", p)  # no think block: correct but badly formatted
    assert r == Reward(1.0, {"accuracy": 1.0, "format": 0.0}, "72")


def test_grade_dispatches_on_verifier():
    assert grade(_wrap("\\boxed{0.5}"), _problem("\\frac{1}{2}", "math")).score == 1.0
    assert grade(_wrap("42"), _problem("42", "exact")).score == 1.0
    cd = _problem("45", "countdown", nums=NUMS, target=TARGET)
    assert grade(_wrap("<answer>88 - 71 + 30 - 2</answer>"), cd).score == 1.0


def test_grade_overlong():
    spec = RewardSpec(overlong_buffer=20, overlong_penalty=1.0)
    r = grade(_wrap("42"), _problem("42", "exact"), spec, n_tokens=90, max_tokens=100)
    assert r.parts == {"accuracy": 1.0, "format": 1.0, "overlong": -0.5} and r.score == 0.5
    with pytest.raises(R1labError, match="n_tokens"):
        grade(_wrap("42"), _problem("42", "exact"), spec)


def test_grade_think_in_prompt():
    p = _problem("42", "exact")
    assert grade("6*7</think> 42", p, think_in_prompt=True).parts == {"accuracy": 1.0, "format": 1.0}
    assert grade("6*7 is 42", p, think_in_prompt=True).parts == {"accuracy": 0.0, "format": 0.0}


def test_grade_errors_name_the_problem():
    with pytest.raises(R1labError, match=r"t/0.*unknown verifier 'poetry'"):
        grade("x", _problem("1", "poetry"))
    with pytest.raises(R1labError, match=r"t/0.*meta\['nums'\]"):
        grade("x", _problem("1", "countdown", target=1))
    with pytest.raises(R1labError, match=r"t/0.*not a single number"):
        grade("x", _problem("many", "gsm8k"))


def test_grade_code_verifier():
    p = _problem("", "code", tests=[{"input": "3\n", "output": "9"}, {"input": "4\n", "output": "16"}])
    r = grade(_wrap("```python\nprint(int(input()) ** 2)\n```"), p)
    assert r.parts == {"accuracy": 1.0, "format": 1.0, "pass_rate": 1.0}
    assert r.answer == "print(int(input()) ** 2)"
    r = grade(_wrap("```python\nprint(9)\n```"), p)
    assert r.parts == {"accuracy": 0.0, "format": 1.0, "pass_rate": 0.5} and r.score == 0.0
