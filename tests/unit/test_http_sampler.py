"""HTTPSampler against a real HTTP server on loopback that speaks chat-completions and misbehaves on cue."""

from __future__ import annotations

import random
import time

import pytest
from loopback_openai import FakeOpenAI, ok_body

from r1lab.rollout.base import Sampler, SamplingParams
from r1lab.rollout.http import (
    HTTPSampler,
    HTTPSamplerError,
    backoff_delay,
    join_reasoning,
    parse_retry_after,
)

PROMPT = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture
def serve():
    servers: list[FakeOpenAI] = []

    def start(behave):
        servers.append(FakeOpenAI(behave))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def sampler(srv: FakeOpenAI, **kw) -> HTTPSampler:
    kw = {"timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.01, **kw}
    return HTTPSampler(srv.base_url, "teacher", **kw)


def test_reasoning_content_becomes_think_block_and_order_is_prompt_major(serve):
    srv = serve(lambda body, i: ("json", 200, ok_body(body, reasoning=f"r{body['messages'][0]['content']}")))
    prompts = [[{"role": "user", "content": "a"}], "b"]  # a raw string is sent as one user turn
    s = sampler(srv, use_n=True)
    assert isinstance(s, Sampler)
    outs = s.generate(prompts, n=3, params=SamplingParams(max_tokens=7, temperature=0.6))
    assert [c.prompt_index for c in outs] == [0, 0, 0, 1, 1, 1]
    assert outs[0].text == "<think>ra</think>\\boxed{4}" and outs[0].reasoning_content == "ra"
    assert outs[3].text == "<think>rb</think>\\boxed{4}"
    assert all(c.finish_reason == "stop" and c.completion_tokens == 10 for c in outs)
    assert len(srv.calls) == 2  # one request with n=3 per prompt
    body = srv.calls[0][1]
    assert (
        body["n"] == 3
        and body["max_tokens"] == 7
        and body["temperature"] == 0.6
        and body["model"] == "teacher"
    )


def test_plain_content_and_length_finish(serve):
    def behave(body, i):
        out = ok_body(body, reasoning=None, content="<think>x</think> 4")
        out["choices"][0]["finish_reason"] = "length"
        return ("json", 200, out)

    outs = sampler(serve(behave)).generate([PROMPT], n=1, params=SamplingParams())
    assert outs[0].text == "<think>x</think> 4" and outs[0].finish_reason == "length"


def test_without_n_sends_one_request_per_sample_with_distinct_seeds(serve):
    srv = serve(lambda body, i: ("json", 200, ok_body(body)))
    outs = sampler(srv).generate([PROMPT, PROMPT], n=4, params=SamplingParams(seed=100, stop=("\n\n",)))
    assert len(outs) == 8 and len(srv.calls) == 8
    bodies = [c[1] for c in srv.calls]
    assert all("n" not in b and b["stop"] == ["\n\n"] for b in bodies)
    assert sorted(b["seed"] for b in bodies) == list(range(100, 108))


def test_server_short_on_choices_is_filled_one_at_a_time(serve):
    def behave(body, i):
        out = ok_body(body)
        out["choices"] = out["choices"][:1]  # ignores n, as some servers do
        return ("json", 200, out)

    srv = serve(behave)
    outs = sampler(srv, use_n=True).generate([PROMPT], n=3, params=SamplingParams())
    assert len(outs) == 3 and all(c.finish_reason == "stop" for c in outs)
    assert len(srv.calls) == 3


def test_429_retry_after_is_honoured(serve):
    srv = serve(
        lambda body, i: (
            ("json", 429, {"error": "slow down"}, {"Retry-After": "1"})
            if i == 0
            else ("json", 200, ok_body(body))
        )
    )
    s = sampler(srv)
    outs = s.generate([PROMPT], n=1, params=SamplingParams())
    assert outs[0].finish_reason == "stop"
    gap = srv.calls[1][0] - srv.calls[0][0]
    assert gap >= 0.95, gap  # waited what the server asked, not the 0.01 s backoff base
    assert s.stats["http_429"] == 1 and s.stats["retries"] == 1


@pytest.mark.parametrize(
    "bad, kind",
    [
        (("json", 500, {"error": "boom"}), "http_500"),
        (("json", 503, {"error": "busy"}), "http_503"),
        (("raw", 200, "<html>not json</html>"), "non_json"),
        (("json", 200, {"choices": [{"index": 0}]}), "bad_response"),
        (("json", 200, {"choices": []}), "bad_response"),
        (("json", 200, {"choices": [{"message": {"content": 5}}]}), "bad_response"),
        (("drop",), "connection_error"),
    ],
)
def test_transient_failures_are_retried_then_succeed(serve, bad, kind):
    srv = serve(lambda body, i: bad if i < 2 else ("json", 200, ok_body(body)))
    s = sampler(srv)
    outs = s.generate([PROMPT], n=1, params=SamplingParams())
    assert outs[0].text.endswith("\\boxed{4}")
    assert s.stats[kind] == 2 and s.stats["retries"] == 2 and s.stats["failed_samples"] == 0


def test_persistent_garbage_is_skipped_with_a_count_not_a_crash(serve):
    srv = serve(
        lambda body, i: (
            ("raw", 200, "garbage")
            if body["messages"][0]["content"] == "bad"
            else ("json", 200, ok_body(body))
        )
    )
    s = sampler(srv, max_retries=2)
    prompts = [PROMPT, [{"role": "user", "content": "bad"}]]
    outs = s.generate(prompts, n=2, params=SamplingParams())
    assert [c.finish_reason for c in outs] == ["stop", "stop", "error", "error"]
    assert outs[2].text == "" and outs[2].prompt_index == 1
    assert s.stats["failed_samples"] == 2 and s.stats["non_json"] == 6  # 2 samples x (1 + 2 retries)


def test_gave_up_n_request_is_not_retried_again_as_singles(serve):
    srv = serve(lambda body, i: ("json", 500, {"error": "down"}))
    s = sampler(srv, use_n=True, max_retries=1)
    outs = s.generate([PROMPT], n=4, params=SamplingParams())
    assert [c.finish_reason for c in outs] == ["error"] * 4
    assert len(srv.calls) == 2 and s.stats["failed_samples"] == 4


def test_hung_connection_times_out_and_is_counted(serve):
    srv = serve(lambda body, i: ("hang", 30))
    s = sampler(srv, timeout_s=0.3, max_retries=1)
    t0 = time.monotonic()
    outs = s.generate([PROMPT], n=1, params=SamplingParams())
    assert time.monotonic() - t0 < 5
    assert outs[0].finish_reason == "error" and s.stats["timeout"] == 2


def test_400_is_skipped_without_retrying(serve):
    srv = serve(lambda body, i: ("json", 400, {"error": {"message": "prompt too long"}}))
    s = sampler(srv)
    outs = s.generate([PROMPT], n=1, params=SamplingParams())
    assert outs[0].finish_reason == "error" and len(srv.calls) == 1 and s.stats["http_400"] == 1


def test_bad_key_fails_fast_with_one_line(serve, monkeypatch):
    srv = serve(lambda body, i: ("json", 401, {"error": {"message": "invalid api key"}}))
    monkeypatch.setenv("TEACHER_KEY", "sk-wrong")
    s = sampler(srv, api_key_env="TEACHER_KEY")
    with pytest.raises(HTTPSamplerError, match="HTTP 401"):
        s.generate([PROMPT] * 20, n=1, params=SamplingParams())
    assert srv.calls[0][2] == "Bearer sk-wrong"
    assert len(srv.calls) <= 8  # at most the requests already in flight (max_concurrency): none sent after


def test_missing_key_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(HTTPSamplerError, match="NO_SUCH_KEY_VAR"):
        HTTPSampler("http://127.0.0.1:9/v1", "m", api_key_env="NO_SUCH_KEY_VAR")


def test_concurrency_is_bounded(serve):
    def behave(body, i):
        time.sleep(0.1)
        return ("json", 200, ok_body(body))

    srv = serve(behave)
    outs = sampler(srv, max_concurrency=3).generate([PROMPT] * 12, n=1, params=SamplingParams())
    assert len(outs) == 12
    assert srv.max_in_flight == 3


def test_retry_after_and_backoff_helpers():
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after(None) is None and parse_retry_after("later") is None
    rng = random.Random(0)
    delays = [backoff_delay(a, 0.5, 4.0, None, rng) for a in range(10) for _ in range(50)]
    assert min(delays) >= 0 and max(delays) <= 4.0
    assert backoff_delay(0, 0.5, 60.0, 3.0, rng) >= 3.0
    assert join_reasoning("", "4") == "4"
