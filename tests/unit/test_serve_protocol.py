"""Pure pieces of the server: request validation, the streaming <think> split, token counts, metrics."""

from __future__ import annotations

import json
import random

import pytest

from r1lab.chat import split_think
from r1lab.serve import protocol as P
from r1lab.serve.metrics import Metrics, percentile, prometheus, usd_per_million
from r1lab.serve.prompts import context_room
from r1lab.serve.reasoning import ThinkSplitter, count_reasoning_tokens, split_completion

USER = [{"role": "user", "content": "hi"}]


def _chat(**fields) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


def _bad(cls, body: bytes) -> P.APIError:
    with pytest.raises(P.APIError) as info:
        P.parse_request(cls, body)
    assert info.value.status == 400
    return info.value


def test_valid_chat_request_keeps_values_and_prefers_max_completion_tokens():
    req = P.parse_request(P.ChatRequest, _chat(max_tokens=5, max_completion_tokens=7, stop="x", n=2, seed=3))
    assert req.token_limit() == 7 and req.stop_list() == ("x",) and req.n == 2 and req.seed == 3
    parts = P.parse_request(
        P.ChatRequest,
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ]
            }
        ).encode(),
    )
    assert parts.messages[0].text() == "ab"


def test_unknown_parameters_are_ignored_like_other_openai_servers():
    assert P.parse_request(P.ChatRequest, _chat(some_future_field=1)).n == 1


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (json.dumps({"messages": []}).encode(), "messages", "invalid_value"),
        (json.dumps({"model": "m"}).encode(), "messages", "missing_required_parameter"),
        (json.dumps({"messages": "hello"}).encode(), "messages", "invalid_value"),
        (
            json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
            "messages.0.role",
            "invalid_value",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
            "messages.0.content",
            "invalid_value",
        ),
        (_chat(max_tokens=0), "max_tokens", "invalid_value"),
        (_chat(max_tokens="10"), "max_tokens", "invalid_value"),
        (_chat(temperature=2.5), "temperature", "invalid_value"),
        (_chat(temperature=True), "temperature", "invalid_value"),
        (_chat(top_p=0), "top_p", "invalid_value"),
        (_chat(n=0), "n", "invalid_value"),
        (_chat(n=P.MAX_N + 1), "n", "invalid_value"),
        (_chat(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
        (_chat(stop=""), "stop", "invalid_value"),
        (_chat(stream="yes"), "stream", "invalid_value"),
        (_chat(frequency_penalty=0.5), "frequency_penalty", "unsupported_parameter"),
        (_chat(logprobs=True), "logprobs", "unsupported_parameter"),
        (_chat(tools=[{"type": "function"}]), "tools", "unsupported_parameter"),
    ],
)
def test_bad_chat_requests_name_the_parameter(body, param, code):
    err = _bad(P.ChatRequest, body)
    assert (err.param, err.code) == (param, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    if param:
        assert param in err.message


def test_unknown_role_message_lists_the_allowed_roles():
    err = _bad(P.ChatRequest, json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode())
    assert "unknown role 'tool'" in err.message


def test_completion_request_accepts_one_or_many_prompts():
    assert P.parse_request(P.CompletionRequest, b'{"prompt": "a"}').prompts() == ["a"]
    assert P.parse_request(P.CompletionRequest, b'{"prompt": ["a", "b"]}').prompts() == ["a", "b"]
    assert _bad(P.CompletionRequest, b'{"prompt": []}').param == "prompt"
    assert _bad(P.CompletionRequest, b'{"prompt": "a", "echo": true}').code == "unsupported_parameter"


def test_context_room_defaults_and_limits():
    assert context_room(10, 100, None, 1000) == 90
    assert context_room(10, 100, 5, 1000) == 5
    assert context_room(10, None, None, 64) == 64
    with pytest.raises(P.APIError) as info:
        context_room(10, 100, 91, 1000)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(P.APIError):
        context_room(100, 100, None, 1000)
    with pytest.raises(P.APIError):
        context_room(0, 100, None, 1000)


# --------------------------------------------------------------------------- <think> splitting

TEXTS = [
    "<think>2+2=4, so 4</think> The answer is 4.",
    "<think>still thinking when the budget ran out",
    "no reasoning at all",
    "  <think>leading spaces</think>\n\nanswer",
    "<think></think>empty reasoning",
    "<thinking is not a tag",
    "<think>a < b and c </thin k> d</think>e",
    "",
]


def _stream(text: str, think_in_prompt: bool, rng: random.Random) -> tuple[str, str, int]:
    splitter, r, c, i = ThinkSplitter(think_in_prompt), "", "", 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 5))
        dr, dc = splitter.feed(text[i:j])
        r, c, i = r + dr, c + dc, j
    dr, dc = splitter.flush()
    return r + dr, c + dc, splitter.think_end


@pytest.mark.parametrize("text", TEXTS)
def test_stream_split_equals_whole_text_split_for_any_chunking(text):
    rng = random.Random(0)
    reasoning, content, think_end = split_completion(text)
    for _ in range(30):
        assert _stream(text, False, rng) == (reasoning or "", content, think_end)


@pytest.mark.parametrize("text", [t for t in TEXTS if split_think(t)[2]])
def test_well_formed_completions_split_exactly_as_the_graders_parser(text):
    reasoning, answer, _ = split_think(text)
    assert split_completion(text)[:2] == (reasoning, answer.lstrip())


def test_malformed_completions_lose_no_text():
    assert split_completion("Hi <think>x</think> y") == (None, "Hi <think>x</think> y", 0)
    assert split_completion("<think>a</think>b</think>c") == ("a", "b</think>c", 16)
    assert split_completion("<think>a</think> 4 <think>more") == ("a", "4 <think>more", 16)


def test_split_with_think_opened_by_the_prompt():
    text = "r1 r2</think> ans"
    assert split_completion(text, think_in_prompt=True) == ("r1 r2", "ans", 13)
    assert _stream(text, True, random.Random(1)) == ("r1 r2", "ans", 13)
    assert split_completion(text, True)[0] == split_think(text, True)[0]


def test_tags_are_never_sent_in_deltas():
    splitter = ThinkSplitter()
    deltas = [splitter.feed(ch) for ch in "<think>x</think>y"] + [splitter.flush()]
    sent = "".join(r + c for r, c in deltas)
    assert sent == "xy"


def test_reasoning_tokens_are_counted_by_position():
    text = "<think>ab</think>cd"
    ends = list(range(1, len(text) + 1))  # one character per token
    _, _, think_end = split_completion(text)
    assert count_reasoning_tokens(ends, think_end) == len("<think>ab</think>")
    assert count_reasoning_tokens(ends, 0) == 0


# --------------------------------------------------------------------------- metrics


def test_metrics_rates_and_prometheus_text():
    m = Metrics(price_per_hour=3.6)
    m.add_step(2.0)
    m.add_request(prompt=10, completion=100, reasoning=40, latency=2.5, ttft=0.1)
    snap = m.snapshot(active=1, queued=2)
    assert snap["tokens_per_second_busy"] == 50.0
    assert snap["usd_per_million_tokens_busy"] == pytest.approx(3.6 * 2 / 3600 / 100 * 1e6)
    assert snap["reasoning_tokens_total"] == 40 and snap["queued_sequences"] == 2
    text = prometheus(snap)
    assert "# TYPE r1lab_requests_total counter" in text and "r1lab_completion_tokens_total 100" in text
    assert "r1lab_tokens_per_second_busy 50.0" in text
    assert usd_per_million(1.0, 0, 1.0) is None
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) == 0.0
