"""A scripted step engine: replays a known reply one character per step, with no model.

It implements the same continuous-batching API as `r1lab.rollout.cpu.CPUEngine` (`add_request`,
`step`, `abort`, `has_unfinished`), honours `max_tokens` and stop strings (holding back text that
could start one), and can sleep per step to stand in for compute. The protocol tests use it where
the exact output matters (the `<think>` split, stop strings, timeouts); everything else is tested
against a real tiny model. `ScriptedTokenizer` is the matching character tokenizer with a chat
template, so `ChatRenderer` works on it unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from r1lab.rollout.base import SamplingParams, StepOutput

DEFAULT_REPLY = "<think>The user wants an answer. 2 + 2 = 4.</think>The answer is 4."


@dataclass
class _Request:
    reply: str
    params: SamplingParams
    pos: int = 0  # characters of the reply generated so far
    sent: int = 0  # characters of the reply already returned as text


class ScriptedEngine:
    """Replays `reply(prompt_ids)` (default: a fixed R1-style answer), one token per step."""

    def __init__(self, reply: str | Callable[[list[int]], str] = DEFAULT_REPLY, step_seconds: float = 0.0):
        self.reply = reply if callable(reply) else (lambda _ids, text=reply: text)
        self.step_seconds = step_seconds
        self.requests: dict[str, _Request] = {}
        self.aborted: list[str] = []
        self._lock = threading.Lock()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            self.requests[request_id] = _Request(self.reply(prompt_ids), params)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[StepOutput]:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        with self._lock:
            outs = [self._advance(rid, req) for rid, req in self.requests.items()]
            for out in outs:
                if out.finished:
                    del self.requests[out.request_id]
        return outs

    @staticmethod
    def _advance(rid: str, req: _Request) -> StepOutput:
        if req.pos >= len(req.reply):  # the reply is over: the "model" emits EOS
            return StepOutput(rid, 0, 0.0, req.reply[req.sent : req.pos], True, "stop")
        char = req.reply[req.pos]
        req.pos += 1
        text = req.reply[: req.pos]
        for stop in req.params.stop:
            at = text.find(stop, req.sent)
            if at >= 0:  # cut the stop string and what follows; finish now
                delta = text[req.sent : at]
                return StepOutput(rid, ord(char), 0.0, delta, True, "stop")
        hold = max((_held(text, s) for s in req.params.stop), default=0)
        delta, req.sent = text[req.sent : len(text) - hold], len(text) - hold
        if req.pos >= req.params.max_tokens:
            return StepOutput(rid, ord(char), 0.0, delta + text[req.sent :], True, "length")
        return StepOutput(rid, ord(char), 0.0, delta, False, None)


def _held(text: str, stop: str) -> int:
    """Characters at the end of `text` that could be the start of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


class ScriptedTokenizer:
    """Character ids (`ord`) with a tiny chat template: `<|role|>content` turns, then `<|assistant|>`."""

    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"

    def __init__(self, think_in_prompt: bool = False):
        self.suffix = "<think>" if think_in_prompt else ""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>" + self.suffix
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]
