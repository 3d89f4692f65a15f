"""Rollout engines: everything that turns prompts into sampled completions.

`Sampler.generate(prompts, n, params)` is the one interface (see `base.py`). Engines:

* `cpu`: `CPUEngine` (torch, this package): batched decoding over a KV cache with continuous
  batching; also the step API the server streams from (`add_request` / `step` / `abort`).
* `vllm`: `vllm.VLLMSampler`, GPU rollouts through vLLM (imported only when asked for).
* `http`: `http.HTTPSampler`, an OpenAI-compatible endpoint (a remote teacher).

    sampler = make_sampler("cpu", model=model, tokenizer=tokenizer)
    sampler = make_sampler("cpu", path="runs/base/checkpoints/latest", dtype="bfloat16")
"""

from __future__ import annotations

import importlib

from r1lab.config import R1labError
from r1lab.rollout.base import Completion, Prompt, Sampler, SamplingParams, StepOutput
from r1lab.rollout.cpu import CPUEngine

__all__ = ["CPUEngine", "Completion", "Prompt", "Sampler", "SamplingParams", "StepOutput", "make_sampler"]

#: kind -> (module, class) of the engines that live in their own modules, imported lazily.
_LAZY = {"vllm": ("r1lab.rollout.vllm", "VLLMSampler"), "http": ("r1lab.rollout.http", "HTTPSampler")}


def make_sampler(kind: str, **kw) -> Sampler:
    """Build a sampler by name: `cpu` (model=, tokenizer= or path=; dtype, seed, max_batch), `vllm`, `http`."""
    if kind == "cpu":
        path = kw.pop("path", None)
        if path is not None:
            from r1lab.modeling import load_model

            kw["model"], kw["tokenizer"] = load_model(path)
        if "model" not in kw or "tokenizer" not in kw:
            raise R1labError("make_sampler('cpu'): pass model= and tokenizer=, or path= of a checkpoint")
        return CPUEngine(**kw)
    if kind not in _LAZY:
        raise R1labError(f"make_sampler: unknown sampler kind {kind!r}; expected cpu, vllm or http")
    module, name = _LAZY[kind]
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError):
        raise R1labError(f"sampler {kind!r} is not available in this version of r1lab") from None
    return cls(**kw)  # vLLM's module says in one line when vLLM or CUDA is missing
