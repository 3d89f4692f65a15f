"""The GRPO stage's config: one typed section per concern, every field documented here once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from r1lab.config import RewardSpec, SamplingSpec, Section, TaskSpec
from r1lab.metrics.emergence import DEFAULT_REFLECTION_WORDS


class RLSection(Section):
    """The algorithm. Defaults are GRPO; recipes/grpo-*.yaml show Dr. GRPO and DAPO settings."""

    steps: int = Field(100, ge=1, description="optimiser steps (one batch of rollouts each)")
    prompts_per_step: int = Field(16, ge=1, description="problems per step")
    group_size: int = Field(8, ge=2, description="completions per problem (G); GRPO compares within a group")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping by global norm")
    epochs: int = Field(
        1, ge=1, description="passes over each batch (mu); 1 = strictly on-policy, ratio is 1"
    )
    minibatches: int = Field(
        1, ge=1, description="optimiser steps per pass (the batch is split into this many)"
    )
    micro_batch_tokens: int = Field(
        2048,
        ge=64,
        description="tokens per forward/backward, padding included (gradient accumulation); 2048 was "
        "fastest on a 2-core CPU at 4M and 34M parameters (benchmarks/train_throughput.py; 4096 was no "
        "faster with r1lab's own forward), GPU recipes use 32768",
    )
    pack_sequences: bool = Field(
        True,
        description="lay several sequences end to end per row in the update (block-diagonal attention, "
        "same log-probs) instead of right-padding each; falls back to padding for models that do not "
        "keep packed sequences apart",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="leave rows whose advantage is 0 out of the forward/backward when kl_coef is 0 (exact: "
        "they add nothing to the gradient; denominators still count them and AdamW still steps)",
    )
    scale_rewards: bool = Field(
        True, description="divide advantages by the group's std (GRPO); false = Dr. GRPO"
    )
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean",
        description="GRPO: seq-mean-token-mean; DAPO: token-mean; Dr. GRPO: seq-mean-token-sum-norm",
    )
    clip_low: float = Field(0.2, ge=0, le=1, description="lower clip range eps_low")
    clip_high: float = Field(0.2, ge=0, description="upper clip range eps_high (DAPO clip-higher: 0.28)")
    kl_coef: float = Field(
        0.0, ge=0, description="weight of the KL penalty to the frozen start model (0: no reference model)"
    )
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="per-token KL estimator")
    dynamic_sampling: bool = Field(
        False, description="drop groups whose rewards are all equal (DAPO), refill from new prompts"
    )
    max_refill_rounds: int = Field(
        2, ge=0, description="extra sampling rounds at most when dynamic sampling refills"
    )
    old_logp: Literal["recompute", "rollout"] = Field(
        "recompute",
        description="old-policy log-probs for epochs > 1: recompute with a forward, or reuse the sampler's",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast of training forwards (weights stay fp32); auto: only where bf16 is native",
    )


class GRPOConfig(Section):
    """`r1lab grpo RECIPE`: reinforcement learning with verifiable rewards on a causal LM."""

    model: str = Field(..., description="a local Hugging Face checkpoint directory (the policy's start)")
    run_dir: str = Field("runs/grpo", description="where config, metrics, samples and checkpoints go")
    seed: int = Field(0, description="seeds sampling, data order and initialisation")
    threads: int | None = Field(None, ge=1, description="torch threads (None: all cores)")
    task: TaskSpec = Field(default_factory=TaskSpec, description="training problems (train split)")
    eval_task: TaskSpec | None = Field(None, description="held-out problems (default: the task's test split)")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="rollout sampling")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="reward weights and length shaping")
    rl: RLSection = Field(default_factory=RLSection)
    engine: Literal["cpu", "vllm"] = Field(
        "cpu", description="rollout engine: r1lab's torch engine, or vLLM (GPU, `gpu` extra)"
    )
    engine_dtype: Literal["float32", "bfloat16"] = Field("float32", description="rollout engine precision")
    device: str = Field("cpu", description="training device: cpu, or cuda on a GPU machine")
    vllm_memory: float = Field(
        0.3, gt=0, le=1, description="share of GPU memory vLLM may take (colocated with training)"
    )
    eval_every: int = Field(0, ge=0, description="held-out evaluation every N steps (0: only at the end)")
    eval_problems: int = Field(200, ge=1, description="held-out problems per evaluation")
    eval_k: int = Field(1, ge=1, description="samples per held-out problem (pass@1 averaged over k)")
    eval_temperature: float = Field(1.0, ge=0, description="held-out sampling temperature")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    samples_every: int = Field(10, ge=0, description="write example completions every N steps (0: never)")
    reflection_words: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFLECTION_WORDS), description="phrases counted as reflection"
    )
    max_seconds: float | None = Field(None, gt=0, description="stop early after this wall time (resumable)")
    progress: bool = Field(True, description="live progress table in the terminal")
