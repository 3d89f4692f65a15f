"""`grade`: the one function RL and evaluation both call to score a completion for a problem.

    from r1lab.rewards import grade
    reward = grade(completion_text, problem, spec=cfg.reward, n_tokens=len(ids), max_tokens=256)
    reward.score, reward.parts, reward.answer   # 1.0, {'accuracy': 1.0, 'format': 1.0}, '72'

The completion is parsed once (`r1lab.chat.parse`). Accuracy comes from the verifier named by
`problem.meta["verifier"]`: "math" (math-verify), "gsm8k" (one ASCII number), "exact" (the
arithmetic task), "countdown" (an equation over `meta["nums"]` reaching `meta["target"]`) or "code"
(`r1lab.rewards.code.code_reward`, tests in a sandbox). Format is 1.0 for a well-formed
`<think>...</think> answer`. With `spec.overlong_buffer > 0`, DAPO's soft overlong punishment is
added. The parts are always reported (so logs show which one moved); the score is
`accuracy_weight * accuracy + format_weight * format + overlong`. For code, accuracy is 1.0 only
if every test passes; the fraction passed is reported as the part `pass_rate`, and the answer is
the extracted program.
"""

from __future__ import annotations

from r1lab.chat import THINK_OPEN, Parsed, parse
from r1lab.config import RewardSpec
from r1lab.rewards.base import Reward
from r1lab.rewards.countdown import check_equation
from r1lab.rewards.math_equiv import math_accuracy
from r1lab.rewards.numeric import RewardError, exact_accuracy, numeric_accuracy
from r1lab.tasks.base import Problem

VERIFIERS = ("math", "gsm8k", "countdown", "exact", "code")


def format_reward(text: str) -> Reward:
    """1.0 iff the completion is `<think>reasoning</think>` followed by a non-empty answer.

    >>> format_reward("<think>2+2=4</think> 4").score, format_reward("4").score
    (1.0, 0.0)
    >>> format_reward("<think>a</think><think>b</think> 4").score  # repeated tags
    0.0
    """
    p = parse(text)
    fmt = 1.0 if p.well_formed else 0.0
    return Reward(fmt, {"format": fmt}, p.answer)


def overlong_penalty(n_tokens: int, max_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_tokens - buffer`, then linearly down to -penalty.

    >>> [overlong_penalty(n, 100, 20) for n in (50, 80, 90, 100, 120)]
    [0.0, 0.0, -0.5, -1.0, -1.0]
    """
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer
    if n_tokens <= start:
        return 0.0
    return -penalty * min(1.0, (n_tokens - start) / buffer)


def _countdown_accuracy(parsed: Parsed, problem: Problem) -> float:
    try:
        nums, target = problem.meta["nums"], problem.meta["target"]
    except KeyError as e:
        raise RewardError(f"problem {problem.id}: countdown verifier needs meta[{e.args[0]!r}]") from None
    return 1.0 if parsed.answer is not None and check_equation(parsed.answer, nums, int(target)) else 0.0


def _code_reward(text: str, problem: Problem) -> Reward:
    """The code verifier's own reward (imported lazily: it brings the sandbox)."""
    try:
        from r1lab.rewards.code import code_reward
    except ModuleNotFoundError as e:
        if e.name is not None and "r1lab.rewards.code".startswith(e.name):
            raise RewardError(
                f"problem {problem.id}: the 'code' verifier (r1lab.rewards.code) is not available"
            ) from None
        raise
    return code_reward(text, problem)


def accuracy(text: str, parsed: Parsed, problem: Problem) -> float:
    """The verifier's accuracy (0.0 or 1.0) for a parsed completion; RewardError for an unknown verifier."""
    verifier = problem.meta.get("verifier")
    try:
        if verifier == "math":
            return math_accuracy(parsed.answer, problem.reference)
        if verifier == "gsm8k":
            return numeric_accuracy(parsed.answer, problem.reference)
        if verifier == "exact":
            return exact_accuracy(parsed.answer, problem.reference)
    except RewardError as e:
        raise RewardError(f"problem {problem.id}: {e}") from None
    if verifier == "countdown":
        return _countdown_accuracy(parsed, problem)
    if verifier == "code":
        return float(_code_reward(text, problem).parts.get("accuracy", 0.0))
    raise RewardError(
        f"problem {problem.id}: unknown verifier {verifier!r} in meta['verifier'] (known: {', '.join(VERIFIERS)})"
    )


def grade(
    text: str,
    problem: Problem,
    spec: RewardSpec | None = None,
    n_tokens: int | None = None,
    max_tokens: int | None = None,
    *,
    think_in_prompt: bool = False,
) -> Reward:
    """Score one completion for one problem (the grader RL and evaluation share).

    `think_in_prompt`: the prompt already ended in `<think>` (DeepSeek-R1's template), so the
    completion starts inside the think block. `n_tokens`/`max_tokens` are needed only when
    `spec.overlong_buffer > 0`.

    >>> from r1lab.tasks.base import Problem
    >>> p = Problem("demo/0", [{"role": "user", "content": "6*12?"}], "72", {"verifier": "gsm8k"})
    >>> grade("<think>6*12=72</think> The answer is 72.", p, RewardSpec(format_weight=0.5))
    Reward(score=1.5, parts={'accuracy': 1.0, 'format': 1.0}, answer='72')
    """
    spec = spec or RewardSpec()
    if think_in_prompt:
        text = THINK_OPEN + text
    parsed = parse(text)
    answer, extra = parsed.answer, {}
    if problem.meta.get("verifier") == "code":  # the answer is the program; keep its partial credit
        code = _code_reward(text, problem)
        acc, answer = float(code.parts.get("accuracy", 0.0)), code.answer
        extra = {"pass_rate": float(code.parts.get("pass_rate", acc))}
    else:
        acc = accuracy(text, parsed, problem)
    fmt = 1.0 if parsed.well_formed else 0.0
    parts = {"accuracy": acc, "format": fmt, **extra}
    score = spec.accuracy_weight * acc + spec.format_weight * fmt
    if spec.overlong_buffer > 0:
        if n_tokens is None or max_tokens is None:
            raise RewardError(
                f"reward.overlong_buffer={spec.overlong_buffer} needs the completion's n_tokens and max_tokens"
            )
        parts["overlong"] = overlong_penalty(
            n_tokens, max_tokens, spec.overlong_buffer, spec.overlong_penalty
        )
        score += parts["overlong"]
    return Reward(score, parts, answer)
