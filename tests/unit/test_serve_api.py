"""The HTTP API against a live uvicorn server on loopback, driven by the official `openai` client and
by raw httpx for what a client library would never send. The scripted engine makes outputs exact;
`test_serve_model.py` runs the same protocol over a real tiny model."""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from openai import OpenAI

from r1lab.serve.app import ServeSettings, create_app
from r1lab.serve.background import serve_in_thread
from r1lab.serve.engine import BatchingEngine
from r1lab.serve.prompts import ChatRenderer
from r1lab.serve.scripted import DEFAULT_REPLY, ScriptedEngine, ScriptedTokenizer

KEY = "test-key"
MODEL = "scripted"
REASONING = "The user wants an answer. 2 + 2 = 4."
ANSWER = "The answer is 4."
MSGS = [{"role": "user", "content": "What is 2+2?"}]


@contextmanager
def live(step_engine=None, max_batch=8, max_queue=8, timeout_s=30.0, think_in_prompt=False, **settings):
    step_engine = step_engine or ScriptedEngine()
    engine = BatchingEngine(step_engine, max_batch=max_batch, max_queue=max_queue, timeout_s=timeout_s)
    settings = {"api_key": KEY, "price_per_hour": 3.6} | settings
    app = create_app(
        engine, ChatRenderer(ScriptedTokenizer(think_in_prompt), 4096), ServeSettings(MODEL, **settings)
    )
    with serve_in_thread(app) as url:
        yield url, engine, step_engine


def client(url: str, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server():
    with live() as (url, engine, step_engine):
        yield url, engine, step_engine


def test_chat_returns_reasoning_separately_with_usage_and_cost(server):
    url, _, _ = server
    r = client(url).chat.completions.create(model=MODEL, messages=MSGS)
    msg = r.choices[0].message
    assert (msg.content, msg.model_extra["reasoning_content"]) == (ANSWER, REASONING)
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.completion_tokens == len(DEFAULT_REPLY) + 1  # characters + EOS
    assert r.usage.completion_tokens_details.reasoning_tokens == len(f"<think>{REASONING}</think>")
    assert r.usage.prompt_tokens == len("<|user|>What is 2+2?<|assistant|>")
    cost = r.model_extra["x_r1lab"]
    assert cost["completion_tokens"] == r.usage.completion_tokens and cost["compute_seconds"] > 0
    assert cost["usd"] == pytest.approx(cost["compute_seconds"] * 3.6 / 3600, rel=1e-3, abs=1e-12)


def test_chat_stream_sends_reasoning_then_content_and_usage_last(server):
    url, _, _ = server
    stream = client(url).chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    kinds, reasoning, content, chunks = [], "", "", list(stream)
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        r, c = delta.model_extra.get("reasoning_content") or "", delta.content or ""
        kinds += ["r"] * bool(r) + ["c"] * bool(c)
        reasoning, content = reasoning + r, content + c
    assert (reasoning, content) == (REASONING, ANSWER)
    assert kinds == sorted(kinds, reverse=True)  # all reasoning deltas come before any content delta
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens_details.reasoning_tokens > 0
    assert last.model_extra["x_r1lab"]["completion_tokens"] == last.usage.completion_tokens


def test_stream_without_usage_puts_the_cost_on_the_last_chunk(server):
    url, _, _ = server
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=MSGS, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop" and "x_r1lab" in chunks[-1].model_extra
    assert all(c.usage is None for c in chunks)


def test_prompt_opening_think_streams_reasoning_from_the_first_token():
    reply = "thinking here</think>done"
    with live(ScriptedEngine(reply), think_in_prompt=True) as (url, _, _):
        r = client(url).chat.completions.create(model=MODEL, messages=MSGS)
        assert (r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content) == (
            "thinking here",
            "done",
        )


def test_n_choices_stop_strings_and_max_tokens(server):
    url, _, _ = server
    r = client(url).chat.completions.create(model=MODEL, messages=MSGS, n=3, stop=["2 + 2"], seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.model_extra["reasoning_content"] == "The user wants an answer. " for c in r.choices)
    assert all(c.finish_reason == "stop" and c.message.content == "" for c in r.choices)
    short = client(url).chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=4)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    streamed = client(url).chat.completions.create(model=MODEL, messages=MSGS, n=2, stream=True)
    finished = sorted(c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_completions_plain_and_streamed(server):
    url, _, _ = server
    c = client(url)
    r = c.completions.create(model=MODEL, prompt=["abc", "de"], max_tokens=7)
    assert [ch.text for ch in r.choices] == [DEFAULT_REPLY[:7]] * 2 and r.usage.prompt_tokens == 5
    text = "".join(
        ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="x", stream=True) if ch.choices
    )
    assert text == DEFAULT_REPLY  # raw text: the completions endpoint does not split reasoning


def test_models_health_metrics_and_page(server):
    url, _, _ = server
    # A request of its own: the metrics must not depend on which tests of this module ran before.
    client(url).chat.completions.create(model=MODEL, messages=MSGS)
    assert [m.id for m in client(url).models.list()] == [MODEL]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # no key needed for health
    snap = httpx.get(f"{url}/v1/metrics", headers=auth()).json()
    assert snap["requests_total"] >= 1 and snap["price_per_hour_usd"] == 3.6
    assert snap["usd_per_million_tokens_busy"] > 0 and snap["tokens_per_second_busy"] > 0
    prom = httpx.get(f"{url}/metrics", headers=auth()).text
    assert "r1lab_completion_tokens_total" in prom and "r1lab_usd_per_million_tokens_busy" in prom
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and 'el("details"' in page.text and "reasoning_content" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, nothing external


def test_wrong_or_missing_key_gets_401_openai_json(server):
    url, _, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model=MODEL, messages=MSGS)
    for headers in ({}, auth("wrong"), {"Authorization": KEY}):
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/metrics").status_code == 401


def test_unknown_model_is_404(server):
    url, _, _ = server
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="gpt-9", messages=MSGS)


MALFORMED = [
    b"{",
    b"null",
    b'"just a string"',
    b'{"messages": "hi"}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": [{"role": "user"}]}',
    b'{"messages": [{"role": "user", "content": {"a": 1}}]}',
    b'{"messages": []}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000000}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 1000}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b"\xff\xfe not utf-8",
]


def test_malformed_requests_get_4xx_json_and_the_server_stays_healthy(server):
    url, _, _ = server
    with httpx.Client(base_url=url, headers=auth(), timeout=30) as http:
        for body in MALFORMED:
            r = http.post("/v1/chat/completions", content=body)
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, body
        r = http.post("/v1/completions", content=b'{"prompt": 5}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        big = http.post("/v1/chat/completions", content=b"x" * (10 * 1024 * 1024))
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert http.get("/v1/nothing").status_code == 404 and http.get("/v1/nothing").json()["error"]
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == ANSWER


def test_full_queue_answers_429_with_retry_after():
    slow = ScriptedEngine(DEFAULT_REPLY * 20, step_seconds=0.01)
    with live(slow, max_batch=1, max_queue=0) as (url, engine, _):
        body = {"model": MODEL, "messages": MSGS, "stream": True}
        with httpx.Client(base_url=url, headers=auth(), timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as first:
                lines = first.iter_lines()  # keep the iterator: dropping it closes the stream
                next(lines)  # the first request holds the only slot now
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
        assert engine.metrics.counts["rejected"] == 1


def test_timeout_gives_408_or_a_stream_error_event():
    slow = ScriptedEngine(DEFAULT_REPLY * 100, step_seconds=0.01)
    with live(slow, timeout_s=0.3) as (url, engine, _):
        with pytest.raises(openai.APIStatusError) as info:
            client(url).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3000)
        assert info.value.status_code == 408
        with pytest.raises(openai.APIError, match="timed out"):
            list(
                client(url).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3000, stream=True)
            )
        assert engine.metrics.counts["timeouts"] == 2


def _wait_idle(engine, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load() == (0, 0)


def _wait_running(engine, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while engine.load()[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load()[0] == 1, "the request never started running"


def test_client_disconnect_frees_the_slot_streaming_and_not():
    slow = ScriptedEngine(DEFAULT_REPLY * 100, step_seconds=0.01)
    with live(slow, max_batch=1, max_queue=0) as (url, engine, step_engine):
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 3000}
        with httpx.Client(base_url=url, headers=auth(), timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
                next(r.iter_lines())
                # The role chunk is sent before the worker admits the job; hang up only once it runs,
                # or the cancel drops it from the queue and the engine never sees an abort.
                _wait_running(engine)
        _wait_idle(engine)
        # A non-streaming client that hangs up mid-generation: send the request on a raw socket,
        # wait until the engine is running it, then close the socket (no timing race with load).
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head + payload)
            _wait_running(engine)
        _wait_idle(engine)
        assert len(step_engine.aborted) == 2 and engine.metrics.counts["aborted"] == 2
        ok = client(url).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5)
        assert ok.choices[0].finish_reason == "length"


def test_nothing_is_written_unless_log_requests_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with live() as (url, _, _):
        client(url).chat.completions.create(model=MODEL, messages=MSGS)
    assert list(tmp_path.iterdir()) == []
    log = tmp_path / "requests.jsonl"
    with live(log_requests=log) as (url, _, _):
        client(url).chat.completions.create(model=MODEL, messages=MSGS)
        list(client(url).chat.completions.create(model=MODEL, messages=MSGS, stream=True))
        client(url).completions.create(model=MODEL, prompt="abc", max_tokens=2)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["endpoint"] for r in records] == ["chat.completions", "chat.completions", "completions"]
    assert records[0]["messages"] == MSGS and records[0]["choices"][0]["content"] == ANSWER
    assert records[1]["choices"][0]["reasoning_content"] == REASONING
    assert records[2]["choices"][0]["text"] == DEFAULT_REPLY[:2] and "x_r1lab" in records[2]
