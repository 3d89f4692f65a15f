"""The wire format of `r1lab serve`: OpenAI/DeepSeek request schemas, response builders, error JSON.

Requests are validated here and nowhere else. Bodies are parsed with pydantic in strict JSON mode,
so `"max_tokens": "10"` or `"temperature": true` are type errors (as with OpenAI), not silently
coerced. Unknown top-level parameters are ignored, as vLLM and most OpenAI-compatible servers do,
so clients that send extra fields keep working; parameters that would change the output and that
this server cannot honour (penalties, logprobs, tools) are rejected with a 400 naming the parameter.

Responses follow OpenAI's objects (`chat.completion`, `chat.completion.chunk`, `text_completion`)
with DeepSeek's extension: the reasoning inside `<think>` is `message.reasoning_content` (or
`delta.reasoning_content` while streaming), separate from `content`, and
`usage.completion_tokens_details.reasoning_tokens` counts it. Each response also carries an
`x_r1lab` object with the measured compute cost of the request.

Every error, whatever its cause, is the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_MESSAGES = 512
MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 64


class APIError(Exception):
    """An error the client caused (or a refusal such as 429): an HTTP status and OpenAI error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object.

    >>> error_body("bad", "invalid_request_error", "n", "invalid_value")["error"]["param"]
    'n'
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """One part of a multi-part message; only text parts exist for a text-only model."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A chat turn. `name` and DeepSeek's `reasoning_content` are accepted and ignored: a model is
    never shown its own earlier reasoning (DeepSeek's multi-turn rule)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Parameters shared by both generation endpoints; ranges are OpenAI's."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their neutral value: this server does not implement them.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> str | None:
        """The first parameter set to a value this server cannot honour, or None."""
        if self.frequency_penalty != 0.0:
            return "frequency_penalty"
        if self.presence_penalty != 0.0:
            return "presence_penalty"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        return None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    def token_limit(self) -> int | None:
        """`max_completion_tokens` (the newer name) wins over `max_tokens` when both are given."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> str | None:
        return "tools" if self.tools else super().unsupported()


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_limit(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> str | None:
        return "echo" if self.echo else super().unsupported()


def parse_request(cls: type[_Sampling], body: bytes) -> _Sampling:
    """Validate a JSON body into `cls`, or raise a 400 `APIError` naming the first bad parameter."""
    try:
        req = cls.model_validate_json(body)
    except ValidationError as e:
        raise _validation_to_api_error(e) from None
    bad = req.unsupported()
    if bad is not None:
        raise APIError(
            400, f"'{bad}' is not supported by this server", param=bad, code="unsupported_parameter"
        )
    return req


def _validation_to_api_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err['msg']}", code="invalid_json")
    if err["type"] == "model_type" and not err["loc"]:
        return APIError(400, "request body must be a JSON object", code="invalid_json")
    # Drop pydantic's union-branch names (e.g. 'str', 'list[TextPart]') from the location.
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "bool")))]
    param = ".".join(str(p) for p in loc) or None
    kind = err["type"]
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    if kind == "extra_forbidden":
        code = "unknown_parameter"
    msg = err["msg"]
    if kind == "literal_error" and loc and loc[-1] == "role":
        msg = f"unknown role {err.get('input')!r}; expected system, developer, user or assistant"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code=code)


# --------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; reasoning tokens are part of the completion tokens, as in OpenAI's API."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def chat_completion(
    request_id: str, model: str, choices: list[dict[str, Any]], usage_obj: dict, cost: dict
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_obj,
        "x_r1lab": cost,
    }


def chat_choice(index: int, content: str, reasoning: str | None, finish_reason: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def chat_chunk(
    request_id: str, model: str, created: int, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `extra` carries `usage` and `x_r1lab` on the last chunk."""
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    out["choices"] = choices
    out.update(extra)
    return out


def chunk_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_completion(
    request_id: str, model: str, choices: list[dict[str, Any]], created: int, **extra: Any
) -> dict[str, Any]:
    out = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    out["choices"] = choices
    out.update(extra)
    return out


def text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def model_list(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "r1lab"}],
    }
