"""The `Sampler` protocol: the one generation interface for RL, evaluation, teacher sampling and serving.

Training never cares which engine produced a completion: the CPU engine (torch), vLLM (GPU) and an
OpenAI-compatible HTTP endpoint all return the same `Completion` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

#: A prompt is either chat messages (rendered with the engine's chat template) or raw text.
Prompt = list[dict[str, str]] | str


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # extra stop strings; the stop string is not part of the text
    seed: int | None = None  # per-call seed; None continues the engine's generator


@dataclass
class Completion:
    """One sampled completion. For `generate(prompts, n, ...)`, completion `i*n + j` is sample j of prompt i."""

    prompt_index: int
    text: str
    token_ids: list[int]
    # log-prob of each completion token under the sampling policy (before temperature/top-p)
    logprobs: list[float]
    # "error": an HTTP engine never delivered this sample (counted, never graded)
    finish_reason: Literal["stop", "length", "error"]
    prompt_token_ids: list[int] = field(default_factory=list)
    reasoning_content: str | None = None  # set by engines whose server splits reasoning (DeepSeek API)


@runtime_checkable
class Sampler(Protocol):
    def generate(self, prompts: list[Prompt], n: int, params: SamplingParams) -> list[Completion]: ...


@dataclass
class StepOutput:
    """What one request produced in one `step()` of a step engine (the CPU engine, vLLM's adapter,
    the serve tests' scripted engine): the new token, its log-prob and text, and whether it ended."""

    request_id: str
    token_id: int | None
    logprob: float | None
    text_delta: str
    finished: bool
    finish_reason: str | None
