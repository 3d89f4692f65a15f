"""`r1lab serve [CHECKPOINT]`: host a checkpoint behind an OpenAI/DeepSeek-compatible API and a chat page.

    r1lab serve                                   # the quickstart's trained model, http://127.0.0.1:8000/
    r1lab serve runs/grpo/checkpoints/latest --port 8001 --api-key "$KEY" --price-per-hour 0.10
    R1LAB_API_KEY=secret r1lab serve ckpt --host 0.0.0.0 --engine vllm   # on a GPU machine

Then any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`.
It binds to 127.0.0.1 unless `--host` says otherwise, enforces the API key when one is given
(flag or R1LAB_API_KEY), and writes prompts and completions nowhere unless `--log-requests PATH`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from r1lab.config import R1labError

DEFAULT_PRICE_PER_HOUR = 0.10  # about a 2-vCPU cloud VM on demand; pass the real figure for yours


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", nargs="?", help="Hugging Face model directory (default: the quickstart's model)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $R1LAB_API_KEY)"
    )
    parser.add_argument("--engine", choices=["cpu", "vllm"], default="cpu", help="cpu (torch) or vllm (GPU)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights and activations (default: float32 on cpu, bfloat16 on vllm)",
    )
    parser.add_argument("--max-batch", type=int, default=32, help="sequences generated together at most")
    parser.add_argument("--max-queue", type=int, default=256, help="sequences waiting at most; beyond: 429")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request, queueing included")
    parser.add_argument(
        "--log-requests", type=Path, default=None, help="append prompts and completions to this JSONL"
    )
    parser.add_argument(
        "--price-per-hour",
        type=float,
        default=DEFAULT_PRICE_PER_HOUR,
        help=f"hardware price in USD per hour, for cost figures (default {DEFAULT_PRICE_PER_HOUR})",
    )
    parser.add_argument(
        "--model-name", default=None, help="name in /v1/models (default: the checkpoint directory's)"
    )
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body cap (413 beyond)")
    parser.add_argument("--seed", type=int, default=0, help="engine seed (requests may pass their own)")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch threads for the cpu engine (default: cores - 1)",
    )


def default_threads() -> int:
    """All cores but one: the HTTP side (JSON, SSE writes) needs a core of its own, and torch's
    intra-op threads spin-wait, so sharing every core with the event loop slows both."""
    return max(1, (os.cpu_count() or 2) - 1)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_batch", "port", "max_body_bytes", "threads"):
        if getattr(args, name) < 1:
            raise R1labError(f"--{name.replace('_', '-')}: must be at least 1 (got {getattr(args, name)})")
    if args.max_queue < 0 or args.timeout <= 0 or args.price_per_hour < 0:
        raise R1labError("--max-queue must be >= 0, --timeout > 0 and --price-per-hour >= 0")
    if args.log_requests is not None and not args.log_requests.parent.is_dir():
        raise R1labError(
            f"--log-requests {args.log_requests}: directory {args.log_requests.parent} does not exist"
        )


def resolve_checkpoint(given: str | None) -> Path:
    """The checkpoint to serve: the argument, or the quickstart's model (built if absent)."""
    if given is not None:
        path = Path(given)
        if not path.is_dir():
            raise R1labError(f"{given}: no such checkpoint directory")
        return path
    try:
        from r1lab.quickstart import default_checkpoint
    except ImportError:
        raise R1labError(
            "no CHECKPOINT given and the quickstart model is not available in this install; "
            "pass a checkpoint directory, e.g. r1lab serve runs/<run>/checkpoints/latest"
        ) from None
    return Path(default_checkpoint())


def _context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_step_engine(kind: str, checkpoint: Path, dtype: str | None, seed: int, max_batch: int):
    """(step engine, tokenizer, context length) for `--engine cpu|vllm`."""
    if kind == "vllm":
        from r1lab.serve.vllm_engine import VLLMStepEngine

        engine = VLLMStepEngine(str(checkpoint), dtype=dtype or "bfloat16", seed=seed, max_batch=max_batch)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
        return engine, tokenizer, engine.max_model_len
    from r1lab.modeling import load_model
    from r1lab.rollout.cpu import CPUEngine

    model, tokenizer = load_model(checkpoint, dtype=dtype or "float32")
    engine = CPUEngine(model, tokenizer, dtype=dtype or "float32", seed=seed)
    return engine, tokenizer, _context_length(model.config)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    api_key = args.api_key or os.environ.get("R1LAB_API_KEY") or None
    if args.engine == "vllm":
        from r1lab.rollout.vllm import import_vllm

        import_vllm()  # fail in one line before loading anything
    checkpoint = resolve_checkpoint(args.checkpoint)
    if args.engine == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    step_engine, tokenizer, context = build_step_engine(
        args.engine, checkpoint, args.dtype, args.seed, args.max_batch
    )

    import uvicorn

    from r1lab.serve.app import ServeSettings, create_app
    from r1lab.serve.engine import BatchingEngine
    from r1lab.serve.metrics import Metrics
    from r1lab.serve.prompts import ChatRenderer

    metrics = Metrics(args.price_per_hour)
    engine = BatchingEngine(
        step_engine,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        metrics=metrics,
    )
    settings = ServeSettings(
        model_name=args.model_name or checkpoint.resolve().name,
        api_key=api_key,
        price_per_hour=args.price_per_hour,
        log_requests=args.log_requests,
        max_body_bytes=args.max_body_bytes,
    )
    app = create_app(engine, ChatRenderer(tokenizer, context), settings)
    if not _is_loopback(args.host) and not api_key:
        print(
            f"r1lab serve: warning: listening on {args.host} with no API key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    where = f"http://{args.host}:{args.port}"
    print(
        f"r1lab serve: {settings.model_name} ({args.engine}) on {where}/  API: {where}/v1  "
        f"key: {'required' if api_key else 'none'}  request log: {args.log_requests or 'off'}",
        file=sys.stderr,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
