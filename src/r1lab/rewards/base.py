"""The `Reward` record: a total score and the parts it was made of, so logs show which part moved."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reward:
    """`score` is what RL optimises; `parts` are named components (accuracy, format, overlong ...).

    `answer` is the final answer the verifier extracted (None if none): evaluation's majority vote
    counts these, and reports show them next to the completion.
    """

    score: float
    parts: dict[str, float] = field(default_factory=dict)
    answer: str | None = None
