"""Rule-based (verifiable) rewards: pure functions from a completion to `Reward(score, parts, answer)`.

    from r1lab.rewards import grade
    grade(text, problem, spec)        # what RL and evaluation both call

The individual rewards, each usable alone: `format_reward` (the `<think>` format), `math_reward`
(math-verify equivalence; `math_equal` is the raw comparison with math-verify's settings),
`gsm8k_reward` (one ASCII number), `exact_reward`, `countdown_reward` (an equation checked by our
own parser with exact fractions) and `overlong_penalty` (DAPO). `r1lab audit-verifier TASK` checks a
verifier against gold answers and adversarial variants (`r1lab.rewards.audit`).
"""

from r1lab.rewards.base import Reward
from r1lab.rewards.countdown import check_equation, countdown_reward, evaluate_equation
from r1lab.rewards.grader import VERIFIERS, accuracy, format_reward, grade, overlong_penalty
from r1lab.rewards.math_equiv import math_equal, math_reward
from r1lab.rewards.numeric import RewardError, exact_reward, gsm8k_reward, single_number

__all__ = [
    "VERIFIERS",
    "Reward",
    "RewardError",
    "accuracy",
    "check_equation",
    "countdown_reward",
    "evaluate_equation",
    "exact_reward",
    "format_reward",
    "grade",
    "gsm8k_reward",
    "math_equal",
    "math_reward",
    "overlong_penalty",
    "single_number",
]
