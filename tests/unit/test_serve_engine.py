"""The batching layer over a step engine: admission, continuous batching, back-pressure, deadlines,
aborts, engine failures and cost attribution (with the scripted engine: exact and fast)."""

from __future__ import annotations

import asyncio
import time

import pytest

from r1lab.rollout.base import SamplingParams
from r1lab.serve.engine import BatchingEngine, QueueFull
from r1lab.serve.scripted import ScriptedEngine

REPLY = "<think>abc</think>xyz"
PARAMS = SamplingParams(max_tokens=100)


class RecordingEngine(ScriptedEngine):
    """Scripted engine that remembers how many requests each step advanced."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batch_sizes: list[int] = []

    def step(self):
        outs = super().step()
        self.batch_sizes.append(len(outs))
        return outs


async def _text(job) -> tuple[list[str], list[str | None]]:
    texts, reasons = [""] * len(job.seqs), [None] * len(job.seqs)
    async for ev in job.events():
        texts[ev.index] += ev.text
        if ev.finished:
            reasons[ev.index] = ev.finish_reason
    return texts, reasons


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_jobs_share_steps_and_never_exceed_max_batch():
    step_engine = RecordingEngine(REPLY, step_seconds=0.001)
    engine = BatchingEngine(step_engine, max_batch=3, max_queue=10)

    async def main():
        # Queue all five before the worker starts: a worker that ran ahead could otherwise finish
        # early jobs before later ones are submitted, and never fill the batch.
        jobs = [engine.submit(f"j{i}", [([1, 2], PARAMS)], 2) for i in range(5)]
        engine.start()
        try:
            return await asyncio.gather(*(_text(j) for j in jobs)), jobs
        finally:
            engine.close()

    results, jobs = _run(main())
    assert all(texts == [REPLY] and reasons == ["stop"] for texts, reasons in results)
    assert max(step_engine.batch_sizes) == 3  # continuous batching, capped
    assert len(step_engine.batch_sizes) < 5 * (len(REPLY) + 1)  # steps were shared, not serial
    assert all(j.seqs[0].tokens == len(REPLY) + 1 for j in jobs)  # reply characters + EOS


def test_n_choices_run_as_separate_sequences_with_their_own_params():
    engine = BatchingEngine(ScriptedEngine(REPLY), max_batch=4, max_queue=0)

    async def main():
        engine.start()
        try:
            seqs = [
                ([1], SamplingParams(max_tokens=3)),
                ([1], SamplingParams(max_tokens=100, stop=("</think>",))),
            ]
            return await _text(engine.submit("j", seqs, 1))
        finally:
            engine.close()

    texts, reasons = _run(main())
    assert texts == ["<th", "<think>abc"] and reasons == ["length", "stop"]


def test_a_full_queue_refuses_and_frees_up_after():
    engine = BatchingEngine(ScriptedEngine(REPLY, step_seconds=0.002), max_batch=1, max_queue=1)

    async def main():
        # Fill the engine before its worker starts, so "a" cannot finish (and free its slot) before
        # "c" is refused, however long this thread is descheduled between the submits.
        first = engine.submit("a", [([1], PARAMS)], 1)
        second = engine.submit("b", [([1], PARAMS)], 1)
        with pytest.raises(QueueFull):
            engine.submit("c", [([1], PARAMS)], 1)
        engine.start()
        try:
            await asyncio.gather(_text(first), _text(second))
            third = engine.submit("d", [([1], PARAMS)], 1)
            return await _text(third)
        finally:
            engine.close()

    assert _run(main()) == ([REPLY], ["stop"])
    assert engine.retry_after() >= 1


def test_deadline_times_out_running_and_waiting_jobs():
    step_engine = ScriptedEngine(REPLY * 50, step_seconds=0.01)
    engine = BatchingEngine(step_engine, max_batch=1, max_queue=4, timeout_s=0.15)

    async def main():
        engine.start()
        try:
            jobs = [engine.submit(f"j{i}", [([1], SamplingParams(max_tokens=10_000))], 1) for i in range(2)]
            return await asyncio.gather(*(_text(j) for j in jobs))
        finally:
            engine.close()

    (_, r1), (_, r2) = _run(main())
    assert r1 == ["timeout"] and r2 == ["timeout"]
    assert step_engine.aborted and not step_engine.requests  # the running one was aborted in the engine
    assert engine.metrics.counts["timeouts"] == 2


def test_cancel_aborts_in_the_engine_and_frees_the_slot():
    step_engine = ScriptedEngine(REPLY * 100, step_seconds=0.005)
    engine = BatchingEngine(step_engine, max_batch=1, max_queue=0)

    async def main():
        engine.start()
        try:
            job = engine.submit("gone", [([1], SamplingParams(max_tokens=10_000))], 1)
            async for ev in job.events():
                if ev.text:
                    break  # the client read one token, then disconnected
            engine.cancel(job)
            deadline = time.monotonic() + 30  # generous: one worker iteration, on a possibly loaded box
            while engine.load() != (0, 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert engine.load() == (0, 0)
            return await _text(engine.submit("next", [([1], PARAMS)], 1))
        finally:
            engine.close()

    assert _run(main())[1] == ["length"]  # the next request ran to its own max_tokens
    assert any(rid.startswith("gone") for rid in step_engine.aborted)
    assert engine.metrics.counts["aborted"] == 1


def test_an_engine_failure_ends_running_jobs_and_the_worker_survives():
    class Flaky(ScriptedEngine):
        fail = True

        def step(self):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return super().step()

    engine = BatchingEngine(Flaky(REPLY), max_batch=2, max_queue=2)

    async def main():
        engine.start()
        try:
            broken = await _text(engine.submit("a", [([1], PARAMS)], 1))
            healthy = await _text(engine.submit("b", [([1], PARAMS)], 1))
            return broken, healthy
        finally:
            engine.close()

    broken, healthy = _run(main())
    assert broken[1] == ["error: RuntimeError"] and healthy == ([REPLY], ["stop"])
    assert engine.metrics.counts["errors"] == 1


def test_step_time_is_split_among_the_sequences_it_advanced():
    engine = BatchingEngine(ScriptedEngine(REPLY, step_seconds=0.002), max_batch=4, max_queue=0)

    async def main():
        engine.start()
        try:
            jobs = [engine.submit(f"j{i}", [([1], PARAMS)], 1) for i in range(2)]
            await asyncio.gather(*(_text(j) for j in jobs))
            return jobs
        finally:
            engine.close()

    jobs = _run(main())
    compute = sum(j.cost(3600.0)["compute_seconds"] for j in jobs)
    assert compute == pytest.approx(engine.metrics.busy_seconds, rel=0.02)
    cost = jobs[0].cost(3600.0)
    assert cost["usd"] == pytest.approx(sum(s.compute_seconds for s in jobs[0].seqs))  # $1 per second
    assert cost["completion_tokens"] == len(REPLY) + 1 and cost["prompt_tokens"] == 1


def test_requests_the_engine_refuses_or_loses_fail_alone():
    class Picky(ScriptedEngine):
        def add_request(self, request_id, prompt_ids, params):
            if prompt_ids == [666]:
                raise ValueError("prompt too long")
            if prompt_ids == [404]:
                return  # accepted, then never produced: the worker must not spin on it
            super().add_request(request_id, prompt_ids, params)

    engine = BatchingEngine(Picky(REPLY), max_batch=4, max_queue=4)

    async def main():
        engine.start()
        try:
            jobs = [engine.submit(f"j{i}", [(ids, PARAMS)], 1) for i, ids in enumerate(([666], [404], [1]))]
            return await asyncio.gather(*(_text(j) for j in jobs))
        finally:
            engine.close()

    refused, lost, fine = _run(main())
    assert refused[1] == ["error: ValueError"] and lost[1] == ["error: lost by the engine"]
    assert fine == ([REPLY], ["stop"])
