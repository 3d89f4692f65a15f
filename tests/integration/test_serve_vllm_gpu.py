"""`--engine vllm`: the same API over vLLM on a GPU, with a tiny Qwen2 checkpoint the project builds.
Skipped without CUDA or without vLLM (`pip install 'r1lab[gpu]'`)."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (the gpu extra)"),
]


def test_vllm_engine_serves_chat_and_completions(tmp_path):
    from openai import OpenAI

    from r1lab.modeling import build_char_tokenizer, build_model, save_checkpoint
    from r1lab.serve.app import ServeSettings, create_app
    from r1lab.serve.background import serve_in_thread
    from r1lab.serve.commands import build_step_engine
    from r1lab.serve.engine import BatchingEngine
    from r1lab.serve.prompts import ChatRenderer

    tokenizer = build_char_tokenizer()
    ckpt = save_checkpoint(build_model("qwen2-4m", tokenizer, seed=0), tokenizer, tmp_path / "qwen2-4m")
    step_engine, served_tokenizer, context = build_step_engine("vllm", ckpt, None, seed=0, max_batch=16)
    engine = BatchingEngine(step_engine, max_batch=16, max_queue=64)
    app = create_app(engine, ChatRenderer(served_tokenizer, context), ServeSettings("qwen2-4m"))
    with serve_in_thread(app, start_timeout=300) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "2+2?"}]
        r = client.chat.completions.create(model="qwen2-4m", messages=msgs, max_tokens=16, seed=1)
        assert 0 < r.usage.completion_tokens <= 16 and r.choices[0].finish_reason in ("stop", "length")
        chunks = list(
            client.chat.completions.create(
                model="qwen2-4m",
                messages=msgs,
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage.completion_tokens <= 16
        c = client.completions.create(model="qwen2-4m", prompt=["1+1=", "3*3="], max_tokens=8, n=2)
        assert len(c.choices) == 4
