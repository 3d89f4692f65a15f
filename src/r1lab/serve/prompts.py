"""Turning requests into prompt token ids with the checkpoint's own tokenizer and chat template.

Chat messages are rendered by the tokenizer's chat template (what the model was trained on), with
`add_generation_prompt=True`. Where transformers supports it, control tokens typed by a user
(`<|assistant|>`, `<eos>`) are encoded as plain text (`sanitize_control_tokens`), so a message
cannot forge a turn of another role. A template whose prompt already ends in `<think>` (as
DeepSeek-R1's does) is detected, so the stream starts in the reasoning block.
"""

from __future__ import annotations

import inspect
from typing import Any

from r1lab.serve.protocol import APIError
from r1lab.serve.reasoning import prompt_opens_think


class ChatRenderer:
    """Wraps a Hugging Face tokenizer: chat messages or raw text -> prompt token ids."""

    def __init__(self, tokenizer: Any, max_context: int | None = None):
        self.tokenizer = tokenizer
        self.max_context = max_context  # prompt + completion tokens the model can attend to
        params = inspect.signature(tokenizer.apply_chat_template).parameters
        self._sanitize = {"sanitize_control_tokens": True} if "sanitize_control_tokens" in params else {}

    def render_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], bool]:
        """(prompt ids, whether the prompt ends inside a think block)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(
                400,
                "this model has no chat template; use /v1/completions with a text prompt",
                param="messages",
            )
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **self._sanitize
        )
        return list(ids), prompt_opens_think(text)

    def encode(self, text: str) -> list[int]:
        """Raw text -> ids, with the tokenizer's BOS if it uses one (as vLLM does for completions)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True))


def context_room(prompt_len: int, max_context: int | None, limit: int | None, default: int) -> int:
    """The completion token budget, or a 400 when the prompt and `max_tokens` do not fit the context.

    >>> context_room(10, 512, None, 256)
    256
    >>> context_room(500, 512, None, 256)
    12
    """
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if max_context is None:
        return limit if limit is not None else default
    room = max_context - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this model's context is {max_context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    if limit is None:
        return min(room, default)
    if limit > room:
        raise APIError(
            400,
            f"max_tokens: {limit} completion tokens + {prompt_len} prompt tokens exceed this model's context "
            f"of {max_context} tokens (at most {room} here)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return limit
