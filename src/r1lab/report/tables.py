"""The report's tables as plain rows of strings: runs overview, evaluations, cost (estimate vs actual).

Actual cost comes from `metrics.jsonl`: FLOPs are the sum of each step's `flops`, wall time is the
last `elapsed` (or the sum of `step_time` when a resume restarted the clock), generated tokens the
sum of `tokens`, and generation time the sum of `rollout_time`. An evaluation-only directory is
priced from its `eval*.json` (`generated_tokens`, `wall_time_s`). Dollars are wall hours x the
price per hour given to the report (the machine the run ran on); the estimate's GPU column keeps
its own price.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1lab.metrics.cost import fmt_dollars, fmt_duration, fmt_si
from r1lab.report.data import RunData
from r1lab.report.plots import series

Table = tuple[list[str], list[list[str]]]  # (header, rows)


def pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def _num(x: Any, digits: int = 1) -> str:
    return f"{x:,.{digits}f}" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def _last(run: RunData, key: str) -> float | None:
    _, ys = series(run.metrics, key)
    return ys[-1] if ys else None


def _model(run: RunData) -> str:
    model = run.config.get("model")
    if isinstance(model, dict):  # r1lab eval: {path: ...} or {name: ..., base_url: ...}
        model = model.get("path") or model.get("name")
    return str(model) if model else "-"


def _shown_path(path: Path) -> str:
    """A run's directory relative to the working directory when it is inside it (shorter), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def overview_table(runs: list[RunData]) -> Table:
    header = ["run", "directory", "model", "steps", "last reward", "last held-out pass@1", "wall time"]
    rows = []
    for run in runs:
        steps, _ = series(run.metrics, "step")
        actual = actual_cost(run)
        rows.append([
            run.name, _shown_path(run.path), _model(run), str(int(steps[-1])) if steps else "-",
            _num(_last(run, "reward"), 3), pct(_last(run, "eval/pass@1")),
            fmt_duration(actual["seconds"]) if actual else "-",
        ])  # fmt: skip
    return header, rows


def _metric_order(key: str) -> tuple[int, int, str]:
    if key.startswith("pass@"):
        rank = 0 if key == "pass@1" else 2
    else:
        rank = 1  # maj@k right after pass@1: the two numbers the R1 report puts side by side
    digits = "".join(ch for ch in key if ch.isdigit())
    return rank, int(digits or 0), key


def eval_table(runs: list[RunData]) -> Table:
    """One row per evaluation file (or held-out block of summary.json), metrics as columns."""
    entries = [(run, label, s) for run in runs for label, s in run.evals]
    keys = sorted({k for _, _, s in entries for k in s if k.startswith(("pass@", "maj@"))}, key=_metric_order)
    header = [
        "run",
        "evaluation",
        "task",
        "problems",
        "k",
        *keys,
        "length (tok)",
        "format",
        "truncated",
        "wall time",
    ]
    rows = []
    for run, label, s in entries:
        task = s.get("task") or "-"
        rows.append([
            run.name, label, str(task), _num(s.get("n_problems"), 0), _num(s.get("k"), 0),
            *(pct(s.get(k)) for k in keys), _num(s.get("response_len_mean")), pct(s.get("format_rate")),
            pct(s.get("truncation_rate")), fmt_duration(s.get("wall_time_s")),
        ])  # fmt: skip
    return header, rows


def _sum(rows: list[dict[str, Any]], key: str) -> float | None:
    _, ys = series(rows, key)
    return sum(ys) if ys else None


def actual_cost(run: RunData) -> dict[str, float | None] | None:
    """What the run actually spent (see the module docstring); None if it recorded nothing."""
    if run.metrics:
        _, elapsed = series(run.metrics, "elapsed")
        resumed = any(b < a for a, b in zip(elapsed, elapsed[1:], strict=False))
        seconds = elapsed[-1] if elapsed and not resumed else _sum(run.metrics, "step_time")
        return {
            "flops": _sum(run.metrics, "flops"),
            "seconds": seconds,
            "gen_tokens": _sum(run.metrics, "tokens"),
            "gen_seconds": _sum(run.metrics, "rollout_time"),
        }
    sums = [s for _, s in run.evals if isinstance(s.get("wall_time_s"), int | float)]
    if not sums:
        return None
    return {
        "flops": None,
        "seconds": sum(s["wall_time_s"] for s in sums),
        "gen_tokens": sum(s.get("generated_tokens") or 0 for s in sums),
        "gen_seconds": sum(s["wall_time_s"] for s in sums),
    }


def _per_million(dollars: float | None, tokens: float | None) -> float | None:
    return dollars / (tokens / 1e6) if dollars is not None and tokens else None


def _hours_cost(seconds: float | None, price: float | None) -> float | None:
    return seconds / 3600 * price if seconds is not None and price is not None else None


def cost_table(runs: list[RunData], price_per_hour: float | None) -> Table:
    """Actual cost, and the estimate beside it when the run directory holds estimate.json."""
    price_label = (
        f"$ at {fmt_dollars(price_per_hour)}/h" if price_per_hour is not None else "$ (no price given)"
    )
    header = [
        "run",
        "what",
        "FLOPs",
        "wall time",
        "achieved FLOP/s",
        "generated tokens",
        price_label,
        "$ / M generated",
    ]
    rows = []
    for run in runs:
        actual = actual_cost(run)
        if actual is not None:
            secs, flops = actual["seconds"], actual["flops"]
            rate = flops / secs if flops and secs else None
            gen_dollars = _hours_cost(actual["gen_seconds"] or secs, price_per_hour)
            rows.append([
                run.name, "actual", fmt_si(flops, "FLOP"), fmt_duration(secs), fmt_si(rate, "FLOP/s"),
                fmt_si(actual["gen_tokens"]), fmt_dollars(_hours_cost(secs, price_per_hour)),
                fmt_dollars(_per_million(gen_dollars, actual["gen_tokens"])),
            ])  # fmt: skip
        est = run.estimate
        if not est or "here" not in est:
            continue
        here, gpu, tokens = est["here"], est.get("gpu") or {}, est.get("workload", {}).get("gen_tokens")
        flops = est.get("flops", {}).get("total")
        rows.append([
            run.name, "estimate, here", fmt_si(flops, "FLOP"), fmt_duration(here.get("seconds")),
            fmt_si(flops / here["seconds"] if flops and here.get("seconds") else None, "FLOP/s"), fmt_si(tokens),
            fmt_dollars(_hours_cost(here.get("seconds"), price_per_hour)),
            fmt_dollars(_per_million(_hours_cost(here.get("gen_seconds"), price_per_hour), tokens)),
        ])  # fmt: skip
        if gpu:
            what = f"estimate, {gpu.get('n_gpus', 1)} x {gpu.get('gpu')} (MFU {gpu.get('mfu')}, {fmt_dollars(gpu.get('price_per_hour'))}/h)"
            rows.append([
                run.name, what, fmt_si(flops, "FLOP"), fmt_duration(gpu.get("seconds")),
                fmt_si(flops / gpu["seconds"] if flops and gpu.get("seconds") else None, "FLOP/s"), fmt_si(tokens),
                fmt_dollars(gpu.get("dollars")), fmt_dollars(gpu.get("dollars_per_million_generated")),
            ])  # fmt: skip
    return header, rows
