"""The `Problem` record every stage passes around, and the errors of task loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from r1lab.config import R1labError


class TaskError(R1labError):
    """A task that does not exist, or a data file that is malformed (the message names file, line, field)."""


@dataclass(frozen=True)
class Problem:
    """One problem: chat messages to prompt with, the reference answer, and metadata.

    `meta["verifier"]` names the rule that grades completions for it (see `r1lab.rewards.grade`):
    "math" (math-verify), "gsm8k" (numbers), "countdown" (equations), "code" (tests in a sandbox),
    or "exact". Other keys are task-specific (e.g. `nums`/`target` for Countdown, `tests` for code).
    """

    id: str
    messages: list[dict[str, str]]
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The last user message: the problem statement itself."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return m.get("content", "")
        return ""
