"""The `r1lab eval` config: which model (a local checkpoint or an endpoint), which tasks, how to sample."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from r1lab.config import RewardSpec, SamplingSpec, Section, TaskSpec


class ModelSource(Section):
    """Either a local Hugging Face checkpoint (`path`) or an OpenAI-compatible endpoint (`base_url` + `name`)."""

    path: str | None = Field(None, description="local Hugging Face checkpoint directory")
    engine: Literal["cpu", "vllm"] = Field(
        "cpu", description="local engine: r1lab's torch engine, or vLLM (GPU)"
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="precision of the local engine")
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1"
    )
    name: str | None = Field(None, description="model name the endpoint serves (required with base_url)")
    api_key_env: str | None = Field(
        None, description="environment variable holding the API key (None: no key)"
    )
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once (endpoint only)")
    timeout_s: float = Field(300.0, gt=0, description="per-request timeout in seconds (endpoint only)")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.base_url is None):
            raise ValueError("set exactly one of model.path (local checkpoint) and model.base_url (endpoint)")
        if self.base_url is not None and not self.name:
            raise ValueError("model.name is required with model.base_url (the model the endpoint serves)")
        return self

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.name} @ {self.base_url}"


class EvalConfig(Section):
    """`r1lab eval RECIPE`: pass@1 (avg over k), maj@k and pass@k of a model on one or more tasks."""

    model: ModelSource = Field(..., description="what to evaluate; a plain string is a local checkpoint path")
    tasks: list[TaskSpec] = Field(
        default_factory=lambda: [TaskSpec(name="arithmetic", split="test", limit=100)],
        min_length=1,
        description="problem sets, evaluated one after another",
    )
    limit: int | None = Field(
        None, ge=1, description="at most this many problems per task (caps each task's limit)"
    )
    k: int = Field(4, ge=1, le=1024, description="samples per problem (pass@1 is averaged over them)")
    ks: list[int] | None = Field(None, description="pass@k values to report (default: 1 and k)")
    sampling: SamplingSpec = Field(
        default_factory=lambda: SamplingSpec(temperature=0.6, top_p=0.95, max_tokens=512),
        description="sampling (DeepSeek-R1 evaluates at temperature 0.6, top-p 0.95)",
    )
    reward: RewardSpec = Field(
        default_factory=RewardSpec, description="grading (accuracy decides correctness)"
    )
    out_dir: str = Field("runs/eval", description="where eval.json, samples.jsonl and config.yaml go")
    seed: int = Field(0, description="sampling seed")
    batch_prompts: int = Field(16, ge=1, description="prompts per call to the sampler (each with k samples)")
    threads: int | None = Field(None, ge=1, description="torch threads for a local model (None: all cores)")
    progress: bool = Field(True, description="progress bar while sampling")

    @field_validator("model", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value
