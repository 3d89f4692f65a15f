"""Load test of `r1lab serve` on loopback: single-stream vs 16-stream throughput, and 64 clients at once.

    .venv/bin/python benchmarks/serve_load.py                      # random-init gpt2-2m, CPU engine
    .venv/bin/python benchmarks/serve_load.py --checkpoint runs/quickstart/...  # a trained model

The server (the real app, the real batching engine, the CPU engine over a tiny model) runs in a
child process, as in a deployment, so clients and server do not share one interpreter lock; the
clients are httpx streaming requests on an asyncio loop, each reading the SSE stream to the end. Three phases, each bounded in requests and in time:

  1. one stream at a time, `--single` requests: tokens/s of a lone user;
  2. 16 concurrent streams: aggregate tokens/s (the batching gain is phase 2 / phase 1);
  3. 64 concurrent clients, `--per-client` requests each: errors (must be 0), p50/p99 latency.

The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from r1lab.serve.app import ServeSettings, create_app  # noqa: E402
from r1lab.serve.background import free_port  # noqa: E402
from r1lab.serve.engine import BatchingEngine  # noqa: E402
from r1lab.serve.metrics import percentile  # noqa: E402
from r1lab.serve.prompts import ChatRenderer  # noqa: E402

PROMPTS = ["What is 17 + 25?", "Compute 123 * 4.", "What is 99 - 58?", "Is 91 prime?"]


def build_engine(args):
    """(step engine, tokenizer, context, model name) for the requested engine."""
    if args.engine == "scripted":
        from r1lab.serve.scripted import ScriptedEngine, ScriptedTokenizer

        reply = "<think>" + "step " * (args.max_tokens // 5) + "</think>done"
        return ScriptedEngine(reply, step_seconds=0.001), ScriptedTokenizer(), 4096, "scripted"
    import torch

    from r1lab.rollout.cpu import CPUEngine

    torch.set_num_threads(args.threads)  # leave a core to the HTTP side, as `r1lab serve` does
    if args.checkpoint:
        from r1lab.modeling import load_model

        model, tokenizer = load_model(args.checkpoint, dtype=args.dtype)
        name = Path(args.checkpoint).name
    else:
        from r1lab.modeling import build_char_tokenizer, build_model

        tokenizer = build_char_tokenizer()
        model = build_model(args.preset, tokenizer, seed=args.seed)
        name = f"{args.preset}-random"
    context = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    return CPUEngine(model, tokenizer, dtype=args.dtype, seed=args.seed), tokenizer, context, name


def serve(args: argparse.Namespace, port: int) -> None:
    """The server process: model, engine, app, uvicorn on loopback."""
    import uvicorn

    step_engine, tokenizer, context, name = build_engine(args)
    engine = BatchingEngine(step_engine, max_batch=args.max_batch, max_queue=256, timeout_s=args.budget + 60)
    settings = ServeSettings(name, api_key=None, price_per_hour=args.price_per_hour)
    app = create_app(engine, ChatRenderer(tokenizer, context), settings)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_ready(url: str, server, timeout: float = 120.0) -> str:
    """Poll /health until the server answers; the served model's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise SystemExit("the server process died while starting")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()["model"]
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start in time")


async def one_request(http: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> tuple[int, float]:
    """Stream one chat completion to the end; (completion tokens, seconds). Raises on any error."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    tokens, done = None, False
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not done or tokens is None:
        raise RuntimeError("stream ended without usage and [DONE]")
    return tokens, time.perf_counter() - t0


async def phase(
    url: str, model: str, clients: int, per_client: int, max_tokens: int, budget_s: float
) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests in a row (stopping at the budget)."""
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    deadline = time.perf_counter() + budget_s
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for k in range(per_client):
            if time.perf_counter() > deadline:
                return
            try:
                n, seconds = await one_request(http, model, c * per_client + k, max_tokens)
                tokens += n
                latencies.append(seconds)
            except Exception as e:  # counted, reported, and the run fails on any
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=budget_s + 60, limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "completion_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 1) if wall > 0 else 0.0,
        "latency_p50_seconds": round(percentile(latencies, 50), 3),
        "latency_p99_seconds": round(percentile(latencies, 99), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["cpu", "scripted"], default="cpu")
    ap.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of a random tiny model")
    ap.add_argument("--preset", default="gpt2-2m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--single", type=int, default=8, help="requests in the single-stream phase")
    ap.add_argument(
        "--per-client", type=int, default=2, help="requests per client in the 16- and 64-client phases"
    )
    ap.add_argument("--budget", type=float, default=120.0, help="seconds at most per phase")
    ap.add_argument("--price-per-hour", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="engine torch threads"
    )
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(args, port), daemon=True)
    server.start()
    try:
        name = wait_ready(url, server)
        asyncio.run(phase(url, name, 2, 1, args.max_tokens, args.budget))  # warm-up, not reported
        single = asyncio.run(phase(url, name, 1, args.single, args.max_tokens, args.budget))
        print(f"1 stream:    {single}")
        sixteen = asyncio.run(phase(url, name, 16, args.per_client, args.max_tokens, args.budget))
        print(f"16 streams:  {sixteen}")
        many = asyncio.run(phase(url, name, 64, args.per_client, args.max_tokens, args.budget))
        print(f"64 clients:  {many}")
        snapshot = httpx.get(f"{url}/v1/metrics").json()
    finally:
        server.terminate()
        server.join(timeout=10)
    speedup = (
        sixteen["tokens_per_second"] / single["tokens_per_second"] if single["tokens_per_second"] else 0.0
    )
    errors = single["errors"] + sixteen["errors"] + many["errors"]
    print(f"batching gain at 16 streams: {speedup:.2f}x (target >= 4x); errors: {errors}")
    print(f"server: {snapshot['tokens_per_second_busy']} tok/s busy, "
          f"${snapshot['usd_per_million_tokens_busy']} per M tokens at ${args.price_per_hour}/h")  # fmt: skip
    figures = {
        "model": name,
        "engine": args.engine,
        "max_tokens": args.max_tokens,
        "single_stream_tokens_per_second": single["tokens_per_second"],
        "streams16_tokens_per_second": sixteen["tokens_per_second"],
        "speedup_16_vs_1": round(speedup, 2),
        "clients64_requests": many["requests"],
        "clients64_errors": many["errors"],
        "clients64_tokens_per_second": many["tokens_per_second"],
        "clients64_latency_p50_seconds": many["latency_p50_seconds"],
        "clients64_latency_p99_seconds": many["latency_p99_seconds"],
        "errors_total": errors,
        "server_tokens_per_second_busy": snapshot["tokens_per_second_busy"],
        "server_usd_per_million_tokens_busy": snapshot["usd_per_million_tokens_busy"],
        "price_per_hour_usd": args.price_per_hour,
    }
    print(json.dumps(figures))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
