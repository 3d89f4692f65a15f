"""An OpenAI-compatible HTTP sampler: a remote teacher (DeepSeek's API, vLLM, `r1lab serve`) as a `Sampler`.

`HTTPSampler(base_url, model).generate(prompts, n, params)` sends `POST {base_url}/chat/completions`
for every prompt, either as `n` separate requests (the default: every server supports n=1) or once
with `n` choices (`use_n=True`, for servers such as vLLM that share the prompt's work; choices a
server leaves short, or an `n` it refuses with a 4xx, are asked for again one at a time). Requests run on a bounded thread pool
(`max_concurrency`), each with its own timeout.

Reasoning servers split a completion in two: DeepSeek's API (and vLLM's reasoning parsers) return
the chain of thought as `message.reasoning_content` (or `message.reasoning`) beside the answer in
`message.content`. The sampler rebuilds the single trace every other r1lab stage expects:
`<think>{reasoning}</think>{content}`.

Failures never crash a run. 429s, 5xx, connection errors, timeouts and malformed bodies (non-JSON,
missing fields) are retried with exponential backoff and full jitter, waiting at least what a
`Retry-After` header asks; after `max_retries` retries the sample is given up and counted in
`sampler.stats`. A given-up sample is still returned in its slot (completion `i*n + j` is always
sample j of prompt i) with empty text and `finish_reason="error"`, so callers skip it by that
reason. Only errors no retry can fix (401/403: bad key, 404: unknown model or URL) raise
`HTTPSamplerError`, at once, with one line.

    sampler = HTTPSampler("https://api.deepseek.com/v1", "deepseek-reasoner", api_key_env="DEEPSEEK_API_KEY")
    outs = sampler.generate([[{"role": "user", "content": "1+1?"}]], n=4, params=SamplingParams())
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from r1lab.chat import THINK_CLOSE, THINK_OPEN
from r1lab.config import R1labError
from r1lab.rollout.base import Completion, Prompt, SamplingParams

#: statuses worth another try: rate limits, timeouts at a proxy, conflicts, and server errors
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: statuses no retry can fix and that would fail every request the same way
FATAL_STATUSES = frozenset({401, 403, 404})


class HTTPSamplerError(R1labError):
    """The endpoint refuses every request (bad key, unknown model or URL), or the sampler is misconfigured."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix; `kind` is what gets counted."""

    def __init__(self, kind: str, retry_after: float | None = None):
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


class _Skip(Exception):
    """One request failed in a way retrying cannot fix (e.g. 400 for this prompt); skip its samples."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


@dataclass
class HTTPCompletion(Completion):
    """A `Completion` from an endpoint: no token ids come back, so the token count is kept apart.

    `completion_tokens` is the server's `usage.completion_tokens` (exact for one choice per request;
    with several choices it is split over them by text length), or None when the server sent no usage.
    """

    completion_tokens: int | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent or garbled.

    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("soon") is None
    True
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(
    attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random
) -> float:
    """Full-jitter exponential backoff (uniform in [0, base * 2**attempt], capped), never below Retry-After.

    >>> backoff_delay(3, 0.5, 60.0, 10.0, random.Random(0)) >= 10.0
    True
    """
    delay = rng.uniform(0.0, min(cap, base * 2**attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def join_reasoning(reasoning: str | None, content: str | None) -> str:
    """One trace from a split reasoning response: `<think>{reasoning}</think>{content}`.

    >>> join_reasoning("2+2=4", "\\\\boxed{4}")
    '<think>2+2=4</think>\\\\boxed{4}'
    >>> join_reasoning(None, "<think>x</think> 4")
    '<think>x</think> 4'
    """
    content = content or ""
    if not reasoning:
        return content
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{content}"


def parse_choices(body: object) -> tuple[list[tuple[str, str | None, str]], int | None]:
    """`(text, reasoning, finish_reason)` per choice and `usage.completion_tokens` from a response body.

    Raises `_Retryable("bad_response")` when the body is not a chat completion (no choices, a choice
    with no message, a content that is not a string): a flaky proxy, not something to crash on.
    """
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise _Retryable("bad_response")
    out = []
    for choice in body["choices"]:
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            raise _Retryable("bad_response")
        content = msg.get("content")
        reasoning = msg.get("reasoning_content", msg.get("reasoning"))
        if content is not None and not isinstance(content, str):
            raise _Retryable("bad_response")
        if reasoning is not None and not isinstance(reasoning, str):
            raise _Retryable("bad_response")
        if content is None and reasoning is None:
            raise _Retryable("bad_response")
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        out.append((join_reasoning(reasoning, content), reasoning, finish))
    usage = body.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return out, tokens if isinstance(tokens, int) and tokens >= 0 else None


def _split_tokens(total: int | None, texts: list[str]) -> list[int | None]:
    """Share a response's completion-token count over its choices in proportion to their text length."""
    if total is None:
        return [None] * len(texts)
    if len(texts) == 1:
        return [total]
    chars = sum(len(t) for t in texts) or 1
    return [round(total * len(t) / chars) for t in texts]


def _failed() -> HTTPCompletion:
    """The placeholder for a sample the endpoint never delivered (callers skip finish_reason 'error')."""
    return HTTPCompletion(-1, "", [], [], "error")  # type: ignore[arg-type]


class HTTPSampler:
    """`Sampler` over an OpenAI-compatible chat-completions endpoint (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        use_n: bool = False,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        seed: int = 0,
    ):
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise HTTPSamplerError(
                "HTTPSampler: max_concurrency >= 1, max_retries >= 0 and timeout_s > 0 required"
            )
        headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise HTTPSamplerError(
                    f"HTTPSampler: environment variable {api_key_env} (the API key) is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.use_n = use_n
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stats: Counter[str] = (
            Counter()
        )  # requests, retries, failed_samples and one count per failure kind
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s), limits=limits)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, key: str, k: int = 1) -> None:
        with self._lock:
            self.stats[key] += k

    def _attempt(self, payload: dict) -> tuple[list[tuple[str, str | None, str]], int | None]:
        """One POST; returns the parsed choices or raises `_Retryable`, `_Skip` or `HTTPSamplerError`."""
        self._count("requests")
        try:
            resp = self._client.post(self.url, json=payload)
        except httpx.TimeoutException:
            raise _Retryable("timeout") from None
        except httpx.TransportError:
            raise _Retryable("connection_error") from None
        if resp.status_code in FATAL_STATUSES:
            raise HTTPSamplerError(
                f"{self.url}: HTTP {resp.status_code} for model {self.model!r} ({resp.text[:200].strip()})"
            )
        if resp.status_code in RETRY_STATUSES:
            raise _Retryable(f"http_{resp.status_code}", parse_retry_after(resp.headers.get("retry-after")))
        if resp.status_code != 200:
            raise _Skip(f"http_{resp.status_code}")
        try:
            body = resp.json()
        except ValueError:
            raise _Retryable("non_json") from None
        return parse_choices(body)

    def _request(self, payload: dict) -> tuple[list[HTTPCompletion], bool]:
        """One logical request with retries: `(completions, gave_up)`; `([], False)` means refused (4xx)."""
        for attempt in range(self.max_retries + 1):
            try:
                choices, tokens = self._attempt(payload)
            except _Skip as e:
                self._count(e.kind)
                return [], False
            except _Retryable as e:
                self._count(e.kind)
                if attempt == self.max_retries:
                    return [], True
                self._count("retries")
                with self._lock:  # random.Random is not thread-safe
                    delay = backoff_delay(
                        attempt, self.backoff_base_s, self.backoff_cap_s, e.retry_after, self._rng
                    )
                time.sleep(delay)
                continue
            texts = [c[0] for c in choices]
            shares = _split_tokens(tokens, texts)
            outs = [
                HTTPCompletion(-1, text, [], [], finish, reasoning_content=reasoning, completion_tokens=ntok)
                for (text, reasoning, finish), ntok in zip(choices, shares, strict=True)
            ]
            return outs, False
        return [], True

    def _payload(self, prompt: Prompt, n: int, params: SamplingParams, seed_offset: int) -> dict:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        payload: dict = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if n > 1:
            payload["n"] = n
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed + seed_offset  # distinct requests must not repeat one sample
        return payload

    def _run_all(self, payloads: list[dict]) -> list[tuple[list[HTTPCompletion], bool]]:
        """Run requests `max_concurrency` at a time; a fatal error (bad key, unknown model) stops every
        request that has not been sent yet, so at most the ones already in flight reach the server."""
        fatal: list[HTTPSamplerError] = []  # the first fatal error, seen by every worker thread

        def run(payload: dict) -> tuple[list[HTTPCompletion], bool] | None:
            if fatal:
                return None  # not sent
            try:
                return self._request(payload)
            except HTTPSamplerError as e:
                fatal.append(e)
                raise

        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            futures = [pool.submit(run, p) for p in payloads]
            results = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if fatal:  # raised in a later request than some that were skipped because of it
            raise fatal[0]
        return results

    def generate(self, prompts: list[Prompt], n: int, params: SamplingParams) -> list[Completion]:
        """Completion `i*n + j` is sample j of prompt i; failed slots come back with finish_reason 'error'."""
        if n < 1:
            raise HTTPSamplerError(f"HTTPSampler.generate: n must be >= 1, got {n}")
        got: list[list[Completion]] = [[] for _ in prompts]
        if self.use_n and n > 1:
            firsts = self._run_all([self._payload(p, n, params, i * n) for i, p in enumerate(prompts)])
            for i, (res, gave_up) in enumerate(firsts):
                # A request that exhausted its retries is not retried again as n singles (n times the
                # wait on a broken server); a refused n or a short answer is filled one at a time.
                got[i] = list(res[:n]) if not gave_up else [_failed() for _ in range(n)]
        missing = [(i, j) for i in range(len(prompts)) for j in range(len(got[i]), n)]
        singles = self._run_all([self._payload(prompts[i], 1, params, i * n + j) for i, j in missing])
        for (i, _), (res, _) in zip(missing, singles, strict=True):
            got[i].append(res[0] if res else _failed())
        out: list[Completion] = []
        for i, per_prompt in enumerate(got):
            for c in per_prompt:
                c.prompt_index = i
            out.extend(per_prompt)
        failed = sum(c.finish_reason == "error" for c in out)
        if failed:
            self._count("failed_samples", failed)
        return out
