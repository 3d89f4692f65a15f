"""The server over the real CPU engine and a real tiny model, driven by the official `openai` client.

The model (gpt2-1m) is trained for a few seconds to answer one question in the R1 format, so the
<think> split is checked on what a model really generated (greedy); other prompts get random text,
on which the protocol must hold just the same."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import torch
from openai import OpenAI

from r1lab.modeling import build_char_tokenizer, build_model
from r1lab.rollout.cpu import CPUEngine
from r1lab.serve.app import ServeSettings, create_app
from r1lab.serve.background import serve_in_thread
from r1lab.serve.engine import BatchingEngine
from r1lab.serve.prompts import ChatRenderer

KEY = "k"
MODEL = "tiny-random"
MSGS = [{"role": "user", "content": "What is 3 + 4?"}]
TAUGHT = [{"role": "user", "content": "What is 2+2?"}]
REASONING, ANSWER = "2+2=4, check 4-2=2.", "The answer is 4."


def _teach(model, tokenizer) -> None:
    """Overfit the model on one R1-format exchange (about 50 AdamW steps)."""
    convo = TAUGHT + [{"role": "assistant", "content": f"<think>{REASONING}</think>{ANSWER}"}]
    ids = torch.tensor([tokenizer.apply_chat_template(convo, tokenize=True, return_dict=False)])  # [1, T]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()


@pytest.fixture(scope="module")
def url():
    # One intra-op thread, as `r1lab serve` uses on 2 cores: the HTTP side needs the other one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = build_model("gpt2-1m", tokenizer, seed=0)
    _teach(model, tokenizer)
    engine = BatchingEngine(CPUEngine(model, tokenizer, seed=0), max_batch=8, max_queue=16)
    context = model.config.n_positions
    app = create_app(
        engine, ChatRenderer(tokenizer, context), ServeSettings(MODEL, api_key=KEY, price_per_hour=1.0)
    )
    try:
        with serve_in_thread(app) as base:
            yield base
    finally:
        torch.set_num_threads(threads)


def client(url: str, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _streamed(url: str, messages=MSGS, **kw) -> tuple[str, str, object, dict]:
    reasoning, content, usage, cost = "", "", None, {}
    stream = client(url).chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kw
    )
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += delta.model_extra.get("reasoning_content") or ""
            content += delta.content or ""
        else:
            usage, cost = chunk.usage, chunk.model_extra["x_r1lab"]
    return reasoning, content, usage, cost


def test_reasoning_and_answer_of_a_real_model_arrive_separately(url):
    r = client(url).chat.completions.create(model=MODEL, messages=TAUGHT, temperature=0, max_tokens=80)
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == (REASONING, ANSWER)
    assert r.choices[0].finish_reason == "stop"
    # One token per character, plus the single tokens <think>, </think> and <eos>.
    assert r.usage.completion_tokens == len(REASONING) + len(ANSWER) + 3
    assert r.usage.completion_tokens_details.reasoning_tokens == len(REASONING) + 2
    reasoning, content, usage, _ = _streamed(url, messages=TAUGHT, temperature=0, max_tokens=80)
    assert (reasoning, content) == (REASONING, ANSWER) and usage == r.usage


def test_chat_stream_and_non_stream_agree_for_one_seed(url):
    r = client(url).chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=24, seed=7, temperature=1.0
    )
    msg = r.choices[0].message
    reasoning, content, usage, cost = _streamed(url, max_tokens=24, seed=7, temperature=1.0)
    assert (msg.model_extra["reasoning_content"] or "", msg.content) == (reasoning, content)
    assert usage.completion_tokens == r.usage.completion_tokens <= 24
    assert usage.prompt_tokens == r.usage.prompt_tokens > 0
    details = usage.completion_tokens_details.reasoning_tokens
    assert details == r.usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens
    assert cost["compute_seconds"] > 0 and cost["usd"] > 0
    assert r.choices[0].finish_reason in ("stop", "length")


def test_greedy_is_deterministic_and_max_tokens_is_honoured(url):
    a = client(url).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    b = client(url).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    assert a.choices[0].message == b.choices[0].message
    assert a.usage.completion_tokens <= 12


def test_concurrent_requests_are_batched_and_all_answered(url):
    def ask(i: int) -> int:
        r = client(url).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16, seed=i, n=2)
        return len(r.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == [2] * 8


def test_completions_and_models(url):
    r = client(url).completions.create(model=MODEL, prompt=["12+3=", "7*6="], max_tokens=8, seed=3)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 16 and r.usage.prompt_tokens == 9
    streamed = "".join(
        c.choices[0].text
        for c in client(url).completions.create(
            model=MODEL, prompt="12+3=", max_tokens=8, seed=3, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text
    assert [m.id for m in client(url).models.list()] == [MODEL]


def test_wrong_api_key_is_refused(url):
    with pytest.raises(openai.AuthenticationError):
        client(url, key="nope").chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4)


def test_a_prompt_longer_than_the_context_is_a_400(url):
    with pytest.raises(openai.BadRequestError, match="context"):
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 600}])
