"""What the routes do: validate, render the prompt, submit to the batching engine, answer or stream.

`Server` holds the engine, the prompt renderer and the settings. A request goes:

    authorize -> read the body (capped) -> validate (protocol.py) -> render the prompt (prompts.py)
    -> sampling params (one per choice) -> submit (429 when the queue is full)
    -> collect the choices (JSON) or stream them (SSE, the <think> split done as text arrives)
    -> book the cost (metrics, x_r1lab, and the JSONL request log only if one was asked for)

A client that disconnects cancels its job, which frees its slots in the engine at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from r1lab.rollout.base import SamplingParams
from r1lab.serve import protocol as P
from r1lab.serve.engine import BatchingEngine, Job, QueueFull
from r1lab.serve.prompts import ChatRenderer, context_room
from r1lab.serve.reasoning import ThinkSplitter, count_reasoning_tokens, split_completion

log = logging.getLogger("r1lab.serve")
DISCONNECT_POLL_S = 0.2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of streams


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    price_per_hour: float = 0.0
    log_requests: Path | None = None  # JSONL of prompts and completions; None: nothing is written
    max_body_bytes: int = 1_000_000
    default_max_tokens: int = 1024  # when a request names no max_tokens (capped by the context)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: str = ""
    token_ends: list[int] = field(default_factory=list)  # cumulative text length after each token
    finish_reason: str | None = None

    def add(self, ev) -> None:
        self.text += ev.text
        if ev.token_id is not None:
            self.token_ends.append(len(self.text))
        if ev.finished:
            self.finish_reason = ev.finish_reason


def _failed(reason: str | None) -> bool:
    return reason == "timeout" or (reason or "").startswith("error")


def _raise_for_failure(reason: str | None) -> None:
    if reason == "timeout":
        raise P.APIError(408, "the request timed out on the server", type="timeout_error", code="timeout")
    if reason is not None and reason.startswith("error"):
        raise P.APIError(
            500, "generation failed; see the server log", type="server_error", code="engine_error"
        )


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The state behind the routes: engine, renderer, settings, request log."""

    def __init__(self, engine: BatchingEngine, renderer: ChatRenderer, settings: ServeSettings):
        self.engine, self.renderer, self.s = engine, renderer, settings
        self.metrics = engine.metrics
        self._log_lock = threading.Lock()

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if not self.s.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.s.api_key.encode()):
            raise P.APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
            )

    async def read_body(self, request: Request) -> bytes:
        cap = self.s.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise P.APIError(413, f"request body is larger than {cap} bytes", code="request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise P.APIError(413, f"request body is larger than {cap} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.s.model_name:
            raise P.APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.s.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(self, req, prompt_len: int, n: int) -> list[SamplingParams]:
        max_tokens = context_room(
            prompt_len, self.renderer.max_context, req.token_limit(), self.s.default_max_tokens
        )
        stop = req.stop_list()
        return [
            SamplingParams(
                req.temperature, req.top_p, max_tokens, stop, None if req.seed is None else req.seed + i
            )
            for i in range(n)
        ]

    def submit(self, kind: str, seqs: list[tuple[list[int], SamplingParams]], prompt_tokens: int) -> Job:
        if len(seqs) > self.engine.capacity:
            raise P.APIError(400, f"n: this server runs at most {self.engine.capacity} sequences", param="n")
        try:
            return self.engine.submit(f"{kind}-{uuid.uuid4().hex}", seqs, prompt_tokens)
        except QueueFull:
            self.metrics.count("rejected")
            wait = self.engine.retry_after()
            raise P.APIError(
                429,
                "the server is busy; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(wait)},
            ) from None

    # ------------------------------------------------------------------ running a job

    async def collect(self, request: Request, job: Job) -> list[_Choice]:
        """All choices of a job; aborts the job if the client disconnects while waiting."""
        choices = [_Choice() for _ in job.seqs]

        async def consume() -> None:
            async for ev in job.events():
                choices[ev.index].add(ev)

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    break
            if task.cancelled() or any(c.finish_reason == "abort" for c in choices):
                return []
            task.result()
        finally:
            self.engine.cancel(job)
        for c in choices:
            _raise_for_failure(c.finish_reason)
        return choices

    def finish(self, job: Job, reasoning_tokens: int, record: dict[str, Any]) -> dict[str, Any]:
        """Book a finished job (metrics, optional request log) and return its `x_r1lab` cost."""
        cost = job.cost(self.s.price_per_hour)
        completion = cost["completion_tokens"]
        self.metrics.add_request(
            cost["prompt_tokens"],
            completion,
            reasoning_tokens,
            cost["latency_seconds"],
            cost["time_to_first_token_seconds"],
        )
        if self.s.log_requests is not None:
            record.update({"time": time.time(), "id": job.id, "x_r1lab": cost})
            line = json.dumps(record, ensure_ascii=False)
            with self._log_lock, open(self.s.log_requests, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        return cost

    # ------------------------------------------------------------------ chat

    async def chat(self, request: Request) -> Response:
        self.authorize(request)
        req: P.ChatRequest = P.parse_request(P.ChatRequest, await self.read_body(request))
        self.check_model(req.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        prompt_ids, think_in_prompt = self.renderer.render_chat(messages)
        params = self.sampling(req, len(prompt_ids), req.n)
        job = self.submit("chatcmpl", [(prompt_ids, p) for p in params], len(prompt_ids))
        record = {
            "endpoint": "chat.completions",
            "messages": messages,
            "params": req.model_dump(exclude={"messages"}),
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self.stream_chat(job, think_in_prompt, include_usage, record)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        choices = await self.collect(request, job)
        if not choices:
            return Response(status_code=499)
        out, reasoning_total = [], 0
        for i, c in enumerate(choices):
            reasoning, content, think_end = split_completion(c.text, think_in_prompt)
            reasoning_total += count_reasoning_tokens(c.token_ends, think_end)
            out.append(P.chat_choice(i, content, reasoning, c.finish_reason or "stop"))
        record["choices"] = [c["message"] | {"finish_reason": c["finish_reason"]} for c in out]
        cost = self.finish(job, reasoning_total, record)
        usage = P.usage(job.prompt_tokens, cost["completion_tokens"], reasoning_total)
        return JSONResponse(P.chat_completion(job.id, self.s.model_name, out, usage, cost))

    async def stream_chat(
        self, job: Job, think_in_prompt: bool, include_usage: bool, record: dict[str, Any]
    ) -> AsyncIterator[str]:
        """SSE chunks: the role, then reasoning/content deltas, a finish chunk per choice, usage, [DONE].

        Events that arrived together are merged into one delta per choice and written at once."""
        model, created = self.s.model_name, int(time.time())
        extra = {"usage": None} if include_usage else {}
        choices = [_Choice() for _ in job.seqs]
        splitters = [ThinkSplitter(think_in_prompt) for _ in job.seqs]
        pieces = [{"reasoning": "", "content": ""} for _ in job.seqs]

        def chunk(choice_list: list[dict[str, Any]], **more: Any) -> str:
            return _sse(P.chat_chunk(job.id, model, created, choice_list, **(more or extra)))

        try:
            role = {"role": "assistant", "content": ""}
            yield "".join(chunk([P.chunk_choice(i, role)]) for i in range(len(job.seqs)))
            remaining = len(job.seqs)
            async for batch in job.batches():
                deltas: dict[int, list[str]] = {}
                finished = []
                for ev in batch:
                    choices[ev.index].add(ev)
                    reasoning, content = splitters[ev.index].feed(ev.text)
                    if ev.finished:
                        if _failed(ev.finish_reason):
                            yield self._stream_error(ev.finish_reason)
                            return
                        more_r, more_c = splitters[ev.index].flush()
                        reasoning, content = reasoning + more_r, content + more_c
                        finished.append(ev)
                    d = deltas.setdefault(ev.index, ["", ""])
                    d[0], d[1] = d[0] + reasoning, d[1] + content
                out = []
                for i, (reasoning, content) in deltas.items():
                    pieces[i]["reasoning"] += reasoning
                    pieces[i]["content"] += content
                    delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
                    if delta:
                        out.append(chunk([P.chunk_choice(i, delta)]))
                for ev in finished:
                    remaining -= 1
                    fin = [P.chunk_choice(ev.index, {}, ev.finish_reason or "stop")]
                    if remaining or include_usage:
                        out.append(chunk(fin))
                    else:  # the last chunk carries the cost
                        cost, _ = self._stream_cost(job, choices, splitters, record, pieces)
                        out.append(chunk(fin, x_r1lab=cost))
                if out:
                    yield "".join(out)
            if include_usage:
                cost, reasoning_total = self._stream_cost(job, choices, splitters, record, pieces)
                usage = P.usage(job.prompt_tokens, cost["completion_tokens"], reasoning_total)
                yield chunk([], usage=usage, x_r1lab=cost) + "data: [DONE]\n\n"
            else:
                yield "data: [DONE]\n\n"
        finally:
            self.engine.cancel(job)  # no-op when finished; frees the slots when the client left

    def _stream_cost(self, job, choices, splitters, record, pieces) -> tuple[dict[str, Any], int]:
        reasoning = sum(
            count_reasoning_tokens(c.token_ends, s.think_end) for c, s in zip(choices, splitters, strict=True)
        )
        record["choices"] = [
            {
                "role": "assistant",
                "content": p["content"],
                "reasoning_content": p["reasoning"],
                "finish_reason": c.finish_reason,
            }
            for p, c in zip(pieces, choices, strict=True)
        ]
        return self.finish(job, reasoning, record), reasoning

    def _stream_error(self, reason: str | None) -> str:
        try:
            _raise_for_failure(reason)
        except P.APIError as e:
            return _sse(e.body()) + "data: [DONE]\n\n"
        return ""

    # ------------------------------------------------------------------ completions

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        req: P.CompletionRequest = P.parse_request(P.CompletionRequest, await self.read_body(request))
        self.check_model(req.model)
        prompts = [self.renderer.encode(t) for t in req.prompts()]
        seqs = [(ids, p) for ids in prompts for p in self.sampling(req, len(ids), req.n)]
        job = self.submit("cmpl", seqs, sum(len(ids) for ids in prompts))
        record = {
            "endpoint": "completions",
            "prompt": req.prompt,
            "params": req.model_dump(exclude={"prompt"}),
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self.stream_text(job, include_usage, record)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        choices = await self.collect(request, job)
        if not choices:
            return Response(status_code=499)
        out = [P.text_choice(i, c.text, c.finish_reason or "stop") for i, c in enumerate(choices)]
        record["choices"] = out
        cost = self.finish(job, 0, record)
        usage = P.usage(job.prompt_tokens, cost["completion_tokens"])
        return JSONResponse(
            P.text_completion(job.id, self.s.model_name, out, int(time.time()), usage=usage, x_r1lab=cost)
        )

    async def stream_text(self, job: Job, include_usage: bool, record: dict[str, Any]) -> AsyncIterator[str]:
        model, created = self.s.model_name, int(time.time())
        choices = [_Choice() for _ in job.seqs]
        try:
            async for batch in job.batches():
                texts: dict[int, list] = {}  # choice -> [text that arrived together, finish reason]
                for ev in batch:
                    choices[ev.index].add(ev)
                    if ev.finished and _failed(ev.finish_reason):
                        yield self._stream_error(ev.finish_reason)
                        return
                    entry = texts.setdefault(ev.index, ["", None])
                    entry[0] += ev.text
                    if ev.finished:
                        entry[1] = ev.finish_reason or "stop"
                out = [
                    _sse(P.text_completion(job.id, model, [P.text_choice(i, text, reason)], created))
                    for i, (text, reason) in texts.items()
                    if text or reason
                ]
                if out:
                    yield "".join(out)
            record["choices"] = [{"text": c.text, "finish_reason": c.finish_reason} for c in choices]
            cost = self.finish(job, 0, record)
            tail: dict[str, Any] = {"x_r1lab": cost}
            if include_usage:
                tail["usage"] = P.usage(job.prompt_tokens, cost["completion_tokens"])
            yield _sse(P.text_completion(job.id, model, [], created, **tail)) + "data: [DONE]\n\n"
        finally:
            self.engine.cancel(job)

    # ------------------------------------------------------------------ observability

    def health(self) -> JSONResponse:
        running, waiting = self.engine.load()
        ok = self.engine.alive
        body = {
            "status": "ok" if ok else "engine stopped",
            "model": self.s.model_name,
            "running": running,
            "waiting": waiting,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    def metrics_snapshot(self) -> dict[str, Any]:
        running, waiting = self.engine.load()
        return self.metrics.snapshot(active=running, queued=waiting)
