"""Continuous batching of concurrent HTTP requests over one shared step engine.

One worker thread owns the step engine (`r1lab.rollout.cpu.CPUEngine`, the vLLM adapter, or the
scripted engine of the tests) and is the only caller of its `add_request`/`step`/`abort`, so the
engine needs no locking of its own. Request handlers on the asyncio loop `submit` a job (one
sequence per choice, `n` of them) and read its events; the worker loop is:

    admit waiting sequences while fewer than `max_batch` are running  (they join mid-flight)
    abort sequences whose client left or whose deadline passed        (their slots free at once)
    step() once: every running sequence advances one token             (one forward for all)
    hand each output to its job's asyncio queue                        (thread-safe)

Back-pressure: at most `max_batch` sequences run and at most `max_queue` wait; a job that does not
fit raises `QueueFull` (the server answers 429 with Retry-After). Each job has a deadline
(`timeout_s` from submission, queueing included). Compute cost is measured, not estimated: each
step's wall time is split evenly among the sequences it advanced.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from r1lab.rollout.base import SamplingParams
from r1lab.serve.metrics import Metrics

log = logging.getLogger("r1lab.serve")


class StepEngine(Protocol):
    """The continuous-batching API of `r1lab.rollout.cpu.CPUEngine` (and of the vLLM adapter)."""

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...
    def step(
        self,
    ) -> list[Any]: ...  # StepOutput: request_id, token_id, logprob, text_delta, finished, finish_reason
    def abort(self, request_id: str) -> None: ...
    def has_unfinished(self) -> bool: ...


def _deliver(deliveries: list[tuple[asyncio.Queue, SeqEvent]]) -> None:
    for queue, ev in deliveries:
        queue.put_nowait(ev)


class QueueFull(Exception):
    """The job does not fit: `max_batch` running and `max_queue` waiting sequences are taken."""


@dataclass(frozen=True)
class SeqEvent:
    """One step of one choice: a token (or nothing) and, on the last event, why it finished."""

    index: int  # which choice of the job
    text: str  # text delta
    token_id: int | None
    finished: bool = False
    finish_reason: str | None = None  # stop | length | timeout | error | abort


@dataclass(eq=False)
class _Seq:
    job: Job
    index: int
    key: str  # request id inside the step engine
    prompt_ids: list[int]
    params: SamplingParams
    tokens: int = 0
    compute_seconds: float = 0.0
    done: bool = False


@dataclass(eq=False)
class Job:
    """One HTTP request's sequences; iterate `events()` on the loop that submitted it."""

    id: str
    prompt_tokens: int  # counted once per distinct prompt (n samples of one prompt count it once)
    deadline: float
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    seqs: list[_Seq] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)

    async def batches(self) -> AsyncIterator[list[SeqEvent]]:
        """Events of all choices until every choice has finished, in lists of those already arrived:
        a reader that falls behind gets several tokens at once (one SSE write instead of many)."""
        remaining = len(self.seqs)
        while remaining:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            remaining -= sum(ev.finished for ev in batch)
            yield batch

    async def events(self) -> AsyncIterator[SeqEvent]:
        """Events of all choices, one at a time, until every choice has finished."""
        async for batch in self.batches():
            for ev in batch:
                yield ev

    def cost(self, price_per_hour: float) -> dict[str, Any]:
        """The `x_r1lab` object: measured seconds, tokens and dollars of this request."""
        # Rounded once, and the dollars derive from the rounded figure, so the two fields agree exactly.
        compute = round(sum(s.compute_seconds for s in self.seqs), 9)
        latency = time.monotonic() - self.submitted
        tokens = sum(s.tokens for s in self.seqs)
        return {
            "latency_seconds": round(latency, 4),
            "time_to_first_token_seconds": (
                round(self.first_token_at - self.submitted, 4) if self.first_token_at else None
            ),
            "compute_seconds": compute,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": tokens,
            "tokens_per_second": round(tokens / latency, 2) if latency > 0 else 0.0,
            "price_per_hour_usd": price_per_hour,
            "usd": compute * price_per_hour / 3600.0,
        }


class BatchingEngine:
    """Admission, batching, deadlines and cost accounting around a `StepEngine` (see module docstring)."""

    def __init__(
        self,
        engine: StepEngine,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        timeout_s: float = 600.0,
        metrics: Metrics | None = None,
    ):
        if max_batch < 1 or max_queue < 0 or timeout_s <= 0:
            raise ValueError("max_batch >= 1, max_queue >= 0 and timeout_s > 0 are required")
        self.engine = engine
        self.max_batch, self.max_queue, self.timeout_s = max_batch, max_queue, timeout_s
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()  # guarded by _cond
        self._cancel: list[Job] = []  # guarded by _cond
        self._running: dict[str, _Seq] = {}  # worker thread only (read for gauges)
        self._ids = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ called from the event loop

    def start(self) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._work, name="r1lab-serve-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def capacity(self) -> int:
        return self.max_batch + self.max_queue

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences, for health and metrics."""
        with self._cond:
            return len(self._running), len(self._waiting)

    def submit(self, job_id: str, seqs: list[tuple[list[int], SamplingParams]], prompt_tokens: int) -> Job:
        """Queue one sequence per (prompt_ids, params) pair, choice i being the i-th pair; raises
        `QueueFull` if they do not all fit. Call it from the event loop that will read the events."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = Job(job_id, prompt_tokens, now + self.timeout_s, loop, now)
        job.seqs = [
            _Seq(job, i, f"{job_id}-{i}-{next(self._ids)}", ids, p) for i, (ids, p) in enumerate(seqs)
        ]
        with self._cond:
            if len(self._running) + len(self._waiting) + len(job.seqs) > self.capacity:
                raise QueueFull(f"{len(self._waiting)} sequences waiting, {len(self._running)} running")
            self._waiting.extend(job.seqs)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: free the job's slots (running ones are aborted in the engine)."""
        if job.done or job.cancelled:
            return
        job.cancelled = True
        with self._cond:
            self._cancel.append(job)
            self._cond.notify()

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's drain time at the measured step rate."""
        snap_steps, busy = self.metrics.steps, self.metrics.busy_seconds
        step_s = busy / snap_steps if snap_steps else 0.05
        return max(1, min(60, round(step_s * 64)))

    # ------------------------------------------------------------------ worker thread

    def _emit(self, seq: _Seq, ev: SeqEvent) -> None:
        self._emit_many([(seq, ev)])

    def _emit_many(self, items: list[tuple[_Seq, SeqEvent]]) -> None:
        """Deliver events to their jobs' loops: one thread-safe wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, SeqEvent]]] = {}
        for seq, ev in items:
            if ev.finished:
                seq.done = True
            by_loop.setdefault(seq.job.loop, []).append((seq.job.queue, ev))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def _finish(self, seq: _Seq, reason: str, abort: bool) -> None:
        if seq.done:
            return
        if abort and seq.key in self._running:
            self.engine.abort(seq.key)
        self._running.pop(seq.key, None)
        self._emit(seq, SeqEvent(seq.index, "", None, True, reason))

    def _take_work(self) -> tuple[list[_Seq], list[Job]] | None:
        """Block until there is something to do; return the sequences to admit and jobs to cancel."""
        with self._cond:
            while not (self._waiting or self._running or self._cancel or self._closing):
                self._cond.wait()
            if self._closing:
                return None
            cancels, self._cancel = self._cancel, []
            dropped = {id(j) for j in cancels}
            admit = []
            while self._waiting and len(self._running) + len(admit) < self.max_batch:
                seq = self._waiting.popleft()
                if id(seq.job) not in dropped:
                    admit.append(seq)
            # Drop cancelled jobs' sequences that were still waiting.
            if dropped:
                self._waiting = deque(s for s in self._waiting if id(s.job) not in dropped)
            for seq in admit:
                self._running[seq.key] = seq  # under the lock so load() sees them at once
            return admit, cancels

    def _work(self) -> None:
        while True:
            work = self._take_work()
            if work is None:
                break
            admit, cancels = work
            try:
                self._iterate(admit, cancels)
            except Exception as e:  # an engine failure ends the running sequences, not the server
                log.exception("engine step failed")
                self.metrics.count("errors")
                for seq in list(self._running.values()):
                    self._safe_finish(seq, f"error: {type(e).__name__}")
        for seq in list(self._running.values()):
            self._safe_finish(seq, "abort")

    def _safe_finish(self, seq: _Seq, reason: str) -> None:
        try:
            self._finish(seq, reason, abort=True)
        except Exception:
            self._running.pop(seq.key, None)
            self._emit(seq, SeqEvent(seq.index, "", None, True, reason))

    def _iterate(self, admit: list[_Seq], cancels: list[Job]) -> None:
        for job in cancels:
            if job.done:  # it finished while the cancel was on its way
                continue
            self.metrics.count("aborted")
            for seq in job.seqs:
                if seq.key in self._running:
                    self._finish(seq, "abort", abort=True)
                elif not seq.done:
                    self._emit(seq, SeqEvent(seq.index, "", None, True, "abort"))
        for seq in admit:
            try:
                self.engine.add_request(seq.key, seq.prompt_ids, seq.params)
            except Exception as e:  # a request the engine refuses fails alone, not the batch
                log.warning("engine refused request %s: %s", seq.key, e)
                self._running.pop(seq.key, None)
                self._emit(seq, SeqEvent(seq.index, "", None, True, f"error: {type(e).__name__}"))
        self._expire(time.monotonic())
        if not self._running:
            return
        t0 = time.perf_counter()
        outputs = self.engine.step()
        dt = time.perf_counter() - t0
        self.metrics.add_step(dt)
        if not outputs and not self.engine.has_unfinished():  # never spin on requests the engine lost
            for seq in list(self._running.values()):
                self._finish(seq, "error: lost by the engine", abort=False)
            return
        advanced = [self._running[o.request_id] for o in outputs if o.request_id in self._running]
        share = dt / max(1, len({s.key for s in advanced}))
        for seq in {s.key: s for s in advanced}.values():
            seq.compute_seconds += share
        stamp = time.monotonic()
        events = []
        for out in outputs:
            seq = self._running.get(out.request_id)
            if seq is None:
                continue
            if out.token_id is not None:
                seq.tokens += 1
                if seq.job.first_token_at is None:
                    seq.job.first_token_at = stamp
            if out.finished:
                self._running.pop(seq.key, None)
            ev = SeqEvent(seq.index, out.text_delta or "", out.token_id, out.finished, out.finish_reason)
            events.append((seq, ev))
        self._emit_many(events)

    def _expire(self, now: float) -> None:
        """End every job past its deadline, running or still waiting."""
        with self._cond:
            late_waiting = [s for s in self._waiting if s.job.deadline < now]
            if late_waiting:
                self._waiting = deque(s for s in self._waiting if s.job.deadline >= now)
        late = {id(s.job): s.job for s in late_waiting}
        late.update({id(s.job): s.job for s in self._running.values() if s.job.deadline < now})
        for job in late.values():
            self.metrics.count("timeouts")  # before the client can see the end of its request
            for seq in job.seqs:
                self._finish(seq, "timeout", abort=True)
