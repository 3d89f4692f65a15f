"""The vLLM adapter's translation (cumulative RequestOutputs -> per-step outputs), with a stand-in for
vLLM's LLMEngine: vLLM itself only runs on GPU machines (tests/integration/test_serve_vllm_gpu.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from r1lab.rollout.base import SamplingParams
from r1lab.serve.vllm_engine import VLLMStepEngine


@dataclass
class _Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict] | None = None


class FakeLLMEngine:
    """Emits a scripted reply, two tokens per step, in vLLM's cumulative output format."""

    def __init__(self, reply: str):
        self.reply, self.live, self.aborted, self.params = reply, {}, [], {}

    def add_request(self, request_id, prompt, params):
        assert set(prompt) == {"prompt_token_ids"}
        self.live[request_id], self.params[request_id] = 0, params

    def abort_request(self, ids):
        for rid in ids:
            self.aborted.append(rid)
            self.live.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        outs = []
        for rid in list(self.live):
            n = min(len(self.reply), self.live[rid] + 2)
            self.live[rid] = n
            done = n == len(self.reply)
            lps = [{ord(c): SimpleNamespace(logprob=-0.5)} for c in self.reply[:n]]
            comp = _Completion(
                self.reply[:n], [ord(c) for c in self.reply[:n]], "stop" if done else None, lps
            )
            outs.append(SimpleNamespace(request_id=rid, outputs=[comp], finished=done))
            if done:
                del self.live[rid]
        return outs


def _adapter(reply: str) -> VLLMStepEngine:
    adapter = VLLMStepEngine.__new__(VLLMStepEngine)  # skip __init__: no vLLM here
    adapter.engine = FakeLLMEngine(reply)
    adapter._vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    adapter._seen = {}
    return adapter


def test_cumulative_outputs_become_one_record_per_new_token():
    adapter = _adapter("<think>x</think>yz")
    adapter.add_request("a", [1, 2], SamplingParams(temperature=0.0, max_tokens=50, stop=("q",), seed=3))
    assert adapter.engine.params["a"] == {
        "temperature": 0.0, "top_p": 1.0, "max_tokens": 50, "stop": ["q"], "seed": 3, "logprobs": 0,
    }  # fmt: skip
    outs = []
    while adapter.has_unfinished():
        outs += adapter.step()
    assert "".join(o.text_delta for o in outs) == "<think>x</think>yz"
    assert [o.token_id for o in outs] == [ord(c) for c in "<think>x</think>yz"]
    assert all(o.logprob == -0.5 for o in outs)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].finish_reason == "stop" and adapter._seen == {}


def test_abort_forwards_to_vllm_and_forgets_the_request():
    adapter = _adapter("abcdef")
    adapter.add_request("a", [1], SamplingParams())
    adapter.step()
    adapter.abort("a")
    adapter.abort("unknown")  # ignored, as the CPU engine does
    assert adapter.engine.aborted == ["a"] and not adapter.has_unfinished() and adapter.step() == []
