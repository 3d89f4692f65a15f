"""`r1lab serve --engine vllm`: vLLM's `LLMEngine` behind the same step API as the CPU engine.

vLLM already batches continuously; this adapter only translates. `add_request` hands vLLM the
prompt token ids (so the chat template is rendered once, by `ChatRenderer`, for both engines);
`step` turns vLLM's cumulative `RequestOutput`s into one `StepOutput`-shaped record per new token
batch (the text and token ids that appeared since the previous step). vLLM is imported lazily and
only exists on GPU machines (`pip install 'r1lab[gpu]'`); elsewhere `VLLMStepEngine` raises one
clear `R1labError`.
"""

from __future__ import annotations

from typing import Any

from r1lab.rollout.base import SamplingParams, StepOutput
from r1lab.rollout.vllm import import_vllm


class VLLMStepEngine:
    """Step API over `vllm.LLMEngine` for a local Hugging Face checkpoint directory."""

    def __init__(self, checkpoint: str, dtype: str = "bfloat16", seed: int = 0, max_batch: int = 256):
        vllm = import_vllm()  # one clear line without vLLM or without a CUDA GPU
        self._vllm = vllm
        args = vllm.EngineArgs(model=checkpoint, dtype=dtype, seed=seed, max_num_seqs=max_batch)
        self.engine = vllm.LLMEngine.from_engine_args(args)
        self._seen: dict[str, tuple[int, int]] = {}  # request -> (tokens, chars) already returned

    @property
    def max_model_len(self) -> int | None:
        config = getattr(self.engine, "model_config", None)
        return getattr(config, "max_model_len", None)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        sp = self._vllm.SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
            logprobs=0,  # the sampled token's log-prob only
        )
        self.engine.add_request(request_id, {"prompt_token_ids": list(prompt_ids)}, sp)
        self._seen[request_id] = (0, 0)

    def abort(self, request_id: str) -> None:
        if self._seen.pop(request_id, None) is not None:
            self.engine.abort_request([request_id])

    def has_unfinished(self) -> bool:
        return bool(self.engine.has_unfinished_requests())

    def step(self) -> list[StepOutput]:
        outs = []
        for ro in self.engine.step():
            if ro.request_id not in self._seen or not ro.outputs:
                continue
            outs.extend(self._convert(ro))
            if ro.finished:
                self._seen.pop(ro.request_id, None)
        return outs

    def _convert(self, ro: Any) -> list[StepOutput]:
        """New tokens of one request since the last step; text goes with the last new token."""
        comp = ro.outputs[0]
        n_seen, chars_seen = self._seen[ro.request_id]
        new_ids = list(comp.token_ids)[n_seen:]
        text = comp.text[chars_seen:]
        self._seen[ro.request_id] = (n_seen + len(new_ids), len(comp.text))
        reason = comp.finish_reason if ro.finished else None
        if reason not in (None, "stop", "length"):
            reason = "stop"  # e.g. vLLM's "abort" for an aborted request
        if not new_ids:
            return [StepOutput(ro.request_id, None, None, text, ro.finished, reason)]
        out = []
        for k, tid in enumerate(new_ids):
            last = k == len(new_ids) - 1
            lp = None
            if comp.logprobs is not None and n_seen + k < len(comp.logprobs):
                entry = comp.logprobs[n_seen + k].get(tid)
                lp = None if entry is None else float(entry.logprob)
            out.append(
                StepOutput(
                    ro.request_id,
                    tid,
                    lp,
                    text if last else "",
                    ro.finished and last,
                    reason if last else None,
                )
            )
        return out
