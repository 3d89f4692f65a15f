"""Serving counters and the cost they imply: tokens/s and $ per million tokens at a price per hour.

The server pays for its hardware by the hour whether it is busy or idle, so two figures are kept:
the *busy* rate (completion tokens per second of engine stepping: what the hardware can do) and
the *wall* rate (tokens per second of uptime: what this deployment delivered). $ per million tokens
is reported for both: `price_per_hour * seconds / 3600 / tokens * 1e6`.

`GET /v1/metrics` returns `snapshot()` as JSON; `GET /metrics` returns `prometheus()` text.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

LATENCY_WINDOW = 2048  # recent requests whose latency feeds p50/p99


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.0
    >>> percentile([1.0, 2.0, 3.0, 4.0], 99)
    4.0
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def usd(seconds: float, price_per_hour: float) -> float:
    """Cost of `seconds` of the hardware at `price_per_hour` dollars.

    >>> usd(3600.0, 2.5)
    2.5
    """
    return seconds * price_per_hour / 3600.0


def usd_per_million(seconds: float, tokens: int, price_per_hour: float) -> float | None:
    """$ per million tokens, None before any token was produced."""
    return usd(seconds, price_per_hour) / tokens * 1e6 if tokens else None


class Metrics:
    """Thread-safe counters: the engine worker adds step time, request handlers add finished requests."""

    def __init__(self, price_per_hour: float = 0.0):
        self.price_per_hour = price_per_hour
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.counts = {
            "requests": 0,  # requests answered with a completion
            "rejected": 0,  # refused with 429 (queue full)
            "timeouts": 0,
            "aborted": 0,  # client went away before the end
            "errors": 0,  # engine failures
            "client_errors": 0,  # 4xx answers (validation, auth)
        }
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.busy_seconds = 0.0  # wall time spent inside engine.step()
        self.steps = 0
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._ttft: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def add_step(self, seconds: float) -> None:
        with self._lock:
            self.busy_seconds += seconds
            self.steps += 1

    def count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def add_request(
        self, prompt: int, completion: int, reasoning: int, latency: float, ttft: float | None
    ) -> None:
        with self._lock:
            self.counts["requests"] += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.reasoning_tokens += reasoning
            self._latency.append(latency)
            if ttft is not None:
                self._ttft.append(ttft)

    def snapshot(self, active: int = 0, queued: int = 0) -> dict[str, Any]:
        with self._lock:
            uptime = time.monotonic() - self.started
            lat, ttft = list(self._latency), list(self._ttft)
            busy, tokens = self.busy_seconds, self.completion_tokens
            out: dict[str, Any] = {
                **{f"{k}_total": v for k, v in self.counts.items()},
                "prompt_tokens_total": self.prompt_tokens,
                "completion_tokens_total": tokens,
                "reasoning_tokens_total": self.reasoning_tokens,
                "engine_steps_total": self.steps,
            }
        price = self.price_per_hour
        out.update(
            {
                "uptime_seconds": round(uptime, 3),
                "busy_seconds": round(busy, 3),
                "utilization": round(busy / uptime, 4) if uptime > 0 else 0.0,
                "active_sequences": active,
                "queued_sequences": queued,
                "tokens_per_second_busy": round(tokens / busy, 2) if busy > 0 else 0.0,
                "tokens_per_second_wall": round(tokens / uptime, 2) if uptime > 0 else 0.0,
                "price_per_hour_usd": price,
                "usd_per_million_tokens_busy": usd_per_million(busy, tokens, price),
                "usd_per_million_tokens_wall": usd_per_million(uptime, tokens, price),
                "latency_p50_seconds": round(percentile(lat, 50), 4),
                "latency_p99_seconds": round(percentile(lat, 99), 4),
                "ttft_p50_seconds": round(percentile(ttft, 50), 4),
                "ttft_p99_seconds": round(percentile(ttft, 99), 4),
            }
        )
        return out


def prometheus(snapshot: dict[str, Any]) -> str:
    """Prometheus text exposition of a snapshot: `*_total` keys are counters, the rest gauges.

    >>> print(prometheus({"requests_total": 3, "utilization": 0.5, "x": None}).splitlines()[1])
    r1lab_requests_total 3
    """
    lines = []
    for key, value in snapshot.items():
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        kind = "counter" if key.endswith("_total") else "gauge"
        lines.append(f"# TYPE r1lab_{key} {kind}")
        lines.append(f"r1lab_{key} {value}")
    return "\n".join(lines) + "\n"
