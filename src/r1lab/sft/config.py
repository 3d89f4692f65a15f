"""Typed configs of the distillation stages: `r1lab sft`, `r1lab sample` and `r1lab distill`.

Each field is documented once, beside the field. `DistillConfig` is simply the other two as its
sections (`sample:` then `sft:`), with the student's training data defaulting to the sampled traces.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from r1lab.config import RewardSpec, SamplingSpec, Section, TaskSpec


class SFTConfig(Section):
    """`r1lab sft RECIPE`: supervised fine-tuning on chat-format JSONL traces, loss on assistant tokens."""

    model: str = Field(..., description="a local Hugging Face checkpoint directory to fine-tune")
    data: list[str] = Field(
        default_factory=list,
        description="JSONL files of {'messages': [...]} rows (r1lab sample's output works)",
    )
    run_dir: str = Field(
        "runs/sft", description="config, metrics, checkpoints; the final model goes to RUN/model"
    )
    seed: int = Field(0, description="seeds data order and dropout")
    threads: int | None = Field(None, ge=1, description="torch threads (None: all cores)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    epochs: int = Field(1, ge=1, description="passes over the data")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimiser steps (None: epochs)"
    )
    batch_size: int = Field(16, ge=1, description="conversations per optimiser step")
    micro_batch_tokens: int = Field(
        8192,
        ge=64,
        description="tokens (with padding) per forward/backward; a step accumulates as many as it needs",
    )
    max_seq_len: int = Field(
        512, ge=8, description="longer conversations are dropped (and counted), never cut"
    )
    batching: Literal["pack", "bucket"] = Field(
        "bucket",
        description="bucket: steps of similar-length conversations, right-padded (measured faster); "
        "pack: several conversations per row, attention kept inside each (see r1lab.sft.data)",
    )
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping by global norm")
    autocast_bf16: bool = Field(False, description="bf16 autocast for forward/backward (weights stay fp32)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    max_seconds: float | None = Field(None, gt=0, description="stop early after this wall time (resumable)")
    progress: bool = Field(True, description="progress bar in the terminal")

    @field_validator("data", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v


class TeacherSpec(Section):
    """Who writes the traces: a local checkpoint (the CPU engine) or any OpenAI-compatible endpoint."""

    kind: Literal["local", "http"] = Field("local", description="local checkpoint or HTTP endpoint")
    path: str | None = Field(None, description="local: Hugging Face checkpoint directory")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="local: engine precision")
    base_url: str | None = Field(
        None, description="http: e.g. https://api.deepseek.com/v1 or http://127.0.0.1:8000/v1"
    )
    model: str | None = Field(None, description="http: the model name the endpoint serves")
    api_key_env: str | None = Field(
        None, description="http: environment variable holding the API key (None: no key)"
    )
    max_concurrency: int = Field(8, ge=1, description="http: requests in flight at most")
    timeout_s: float = Field(300.0, gt=0, description="http: seconds per request before it is retried")
    max_retries: int = Field(
        4, ge=0, description="http: retries of a failed request before its sample is skipped"
    )
    use_n: bool = Field(
        False, description="http: ask for k choices in one request (vLLM) instead of k requests"
    )
    think_in_prompt: bool = Field(
        False,
        description="the teacher's template ends the prompt with <think> (DeepSeek-R1 distills): "
        "completions are graded and kept with it prepended",
    )

    @model_validator(mode="after")
    def _needs_its_fields(self):
        if self.kind == "local" and not self.path:
            raise ValueError("teacher.kind 'local' needs teacher.path (a checkpoint directory)")
        if self.kind == "http" and not (self.base_url and self.model):
            raise ValueError("teacher.kind 'http' needs teacher.base_url and teacher.model")
        return self

    def name(self) -> str:
        """How provenance records the teacher."""
        return f"local:{self.path}" if self.kind == "local" else f"http:{self.base_url}#{self.model}"


class SampleConfig(Section):
    """`r1lab sample RECIPE`: k teacher samples per problem, graded; the verified ones kept (rejection sampling)."""

    teacher: TeacherSpec = Field(..., description="the model that writes the traces")
    task: TaskSpec = Field(
        default_factory=TaskSpec, description="problems to sample (usually the train split)"
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="teacher sampling")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="grading (n_tokens/overlong as in RL)")
    k: int = Field(4, ge=1, description="samples per problem")
    require_format: bool = Field(True, description="keep only traces with a well-formed <think> block")
    max_keep: int | None = Field(None, ge=1, description="distinct accepted traces kept per problem at most")
    output: str = Field("runs/sample/traces.jsonl", description="kept traces (chat JSONL); resumable")
    problems_per_call: int = Field(16, ge=1, description="problems per generate call (the teacher's batch)")
    seed: int = Field(0, description="seeds the teacher's sampling")
    threads: int | None = Field(None, ge=1, description="torch threads for a local teacher (None: all cores)")
    progress: bool = Field(True, description="print one line per problem")


class DistillConfig(Section):
    """`r1lab distill RECIPE`: sample verified traces from a teacher, then SFT the student on them."""

    sample: SampleConfig = Field(..., description="the sampling stage (teacher, task, k, output)")
    sft: SFTConfig = Field(..., description="the student's SFT; `data` defaults to sample.output")

    @model_validator(mode="before")
    @classmethod
    def _student_reads_the_traces(cls, data):
        if (
            isinstance(data, dict)
            and isinstance(data.get("sft"), dict)
            and isinstance(data.get("sample"), dict)
        ):
            if not data["sft"].get("data"):
                output = data["sample"].get("output", SampleConfig.model_fields["output"].default)
                data = {**data, "sft": {**data["sft"], "data": [output]}}
        return data
