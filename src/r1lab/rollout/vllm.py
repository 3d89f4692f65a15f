"""vLLM as a `Sampler` (GPU): the same `generate(prompts, n, params) -> list[Completion]` contract.

For evaluation and teacher sampling it serves a checkpoint directory as it is. For RL
(`VLLMRolloutEngine`), vLLM runs in the training process next to the policy (colocated, as TRL's
`vllm_mode="colocate"` and verl do) and `sync_weights()` copies the policy's current weights into
vLLM's model before each rollout, so rollouts are on-policy. vLLM is imported lazily: it exists only
in the `gpu` extra and needs CUDA; without it, construction fails with one clear line.

Log-probs: vLLM returns the sampled token's log-prob under its sampling distribution; with
`logprobs_mode="raw_logprobs"` (vLLM >= 0.10) that is the raw policy, which is what the trainer
recomputes. Older versions return processed log-probs; the trainer then recomputes the old policy
itself (`rl.old_logp: recompute`), so nothing depends on them being exact.
"""

from __future__ import annotations

import os

from r1lab.config import R1labError
from r1lab.rollout.base import Completion, Prompt, SamplingParams


def import_vllm():
    """The vllm module, or one clear line saying why not (not installed, or no CUDA GPU)."""
    os.environ.setdefault(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
    )  # keep the model in this process (weight sync)
    try:
        import torch
        import vllm
    except Exception as e:  # ImportError, or a CUDA/driver error raised while importing
        raise R1labError(
            f"vLLM is not available ({type(e).__name__}): pip install -e '.[gpu]' on a machine with a CUDA "
            "GPU, or use the cpu engine"
        ) from None
    if not torch.cuda.is_available():
        raise R1labError("vLLM needs a CUDA GPU and none is visible (use the cpu engine on this machine)")
    return vllm


class VLLMSampler:
    """A checkpoint directory served by vLLM's offline `LLM`, behind the Sampler protocol."""

    def __init__(
        self,
        path: str,
        dtype: str = "bfloat16",
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
    ):
        vllm = import_vllm()
        self._vllm = vllm
        kwargs = {
            "model": str(path),
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": True,
        }
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        try:
            self.llm = vllm.LLM(**kwargs, logprobs_mode="raw_logprobs")
        except TypeError:  # vLLM < 0.10 has no logprobs_mode
            self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)

    def generate(self, prompts: list[Prompt], n: int, params: SamplingParams) -> list[Completion]:
        sp = self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
            logprobs=0,  # the sampled token's own log-prob
        )
        ids = [self._prompt_ids(p) for p in prompts]
        try:  # vLLM >= 0.10
            inputs = [{"prompt_token_ids": x} for x in ids]
            outputs = self.llm.generate(inputs, sp, use_tqdm=False)
        except TypeError:
            outputs = self.llm.generate(prompt_token_ids=ids, sampling_params=sp, use_tqdm=False)
        out: list[Completion] = []
        for i, o in enumerate(outputs):
            for c in o.outputs:
                token_ids = list(c.token_ids)
                logprobs = [
                    float(step[t].logprob) for t, step in zip(token_ids, c.logprobs or [], strict=False)
                ]
                out.append(
                    Completion(
                        prompt_index=i,
                        text=c.text,
                        token_ids=token_ids,
                        logprobs=logprobs if len(logprobs) == len(token_ids) else [0.0] * len(token_ids),
                        finish_reason="length" if c.finish_reason == "length" else "stop",
                        prompt_token_ids=ids[i],
                    )
                )
        return out


class VLLMRolloutEngine(VLLMSampler):
    """vLLM colocated with the policy being trained; `sync_weights()` pushes the policy's weights in."""

    def __init__(
        self,
        policy,
        tokenizer,
        path: str,
        dtype: str = "bfloat16",
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
    ):
        super().__init__(path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
        self.policy = policy

    def _runner_model(self):
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        if executor is not None:  # V0 engine, or V1 with VLLM_ENABLE_V1_MULTIPROCESSING=0
            return executor.driver_worker.model_runner.model
        core = engine.engine_core.engine_core  # V1 in-process core
        return core.model_executor.driver_worker.worker.model_runner.model

    def sync_weights(self) -> None:
        state = self.policy.state_dict()
        self._runner_model().load_weights(((k, v) for k, v in state.items()))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
