"""Curves over training steps as PNG images (base64, for embedding in one HTML file), via matplotlib's Agg.

One figure per metric; every run is one colour on the same axes, so runs compare at a glance. Noisy
curves with many points are drawn faint, with an exponential moving average on top. Figures are
built with `matplotlib.figure.Figure` directly (no pyplot): no global state, no display needed.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
SMOOTH_ABOVE = 60  # points; longer curves get a moving average over a faint raw line


@dataclass(frozen=True)
class PlotSpec:
    key: str  # the main metrics.jsonl key (also the plot's id in the page)
    title: str
    ylabel: str
    extra: tuple[str, ...] = ()  # further keys on the same axes, dashed (e.g. max beside mean)
    points: bool = False  # sparse values (held-out evaluations): markers, no smoothing
    rate: bool = False  # a fraction in [0, 1]: shown as a percentage

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.extra)


BASE_SPECS = (
    PlotSpec("reward", "Reward (training batch mean)", "reward"),
    PlotSpec("accuracy", "Accuracy (training batch)", "correct", rate=True),
    PlotSpec("eval/pass@1", "Held-out pass@1", "pass@1", points=True, rate=True),
    PlotSpec(
        "response_len_mean", "Response length (mean; max dashed)", "tokens", extra=("response_len_max",)
    ),
    PlotSpec("reflection_rate", "Reflection words (share of responses)", "responses", rate=True),
    PlotSpec("entropy", "Policy entropy", "nats / token"),
    PlotSpec("kl", "KL to the reference model", "nats / token"),
    PlotSpec("clip_frac", "Clipped ratio fraction", "tokens", rate=True),
)


def specs_for(metrics_per_run: Sequence[Sequence[dict[str, Any]]]) -> list[PlotSpec]:
    """The plots these runs can fill: the base set plus one per `reward/<part>`, where any run has data."""
    present: set[str] = set()
    for rows in metrics_per_run:
        for row in rows:
            present.update(k for k, v in row.items() if _number(v) is not None)
    parts = sorted(k for k in present if k.startswith("reward/"))
    specs = list(BASE_SPECS[:1])
    specs += [PlotSpec(k, f"Reward part: {k.split('/', 1)[1]}", "mean", rate=True) for k in parts]
    specs += BASE_SPECS[1:]
    return [s for s in specs if any(k in present for k in s.keys)]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key; rows without a number for it are skipped.

    >>> series([{"step": 1, "kl": 0.1}, {"step": 2}, {"step": 3, "kl": None}, {"step": 4, "kl": 0.3}], "kl")
    ([1.0, 4.0], [0.1, 0.3])
    """
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _number(row.get(key))
        if y is not None:
            xs.append(_number(row.get("step")) or float(i + 1))
            ys.append(y)
    return xs, ys


def ema(values: Sequence[float], span: float) -> list[float]:
    """Exponential moving average with the usual span parametrisation (alpha = 2 / (span + 1)).

    >>> ema([0.0, 1.0, 1.0], span=3)
    [0.0, 0.5, 0.75]
    """
    alpha = 2.0 / (span + 1.0)
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def flat_range(value: float, rate: bool) -> tuple[float, float]:
    """y-limits for a constant curve: the whole 0-100% for a rate, else the value +- half of it.

    >>> flat_range(0.0, rate=True), flat_range(0.0, rate=False), flat_range(-2.0, rate=False)
    ((0.0, 1.0), (0.0, 1.0), (-3.0, -1.0))
    """
    if rate or value == 0:
        return (0.0, 1.0) if 0 <= value <= 1 else (value - 0.5, value + 0.5)
    pad = abs(value) * 0.5
    return value - pad, value + pad


def plot_png(spec: PlotSpec, runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str | None:
    """One figure for `spec` with every run that has data, as a base64 PNG; None if no run has any."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = Figure(figsize=(5.6, 3.3), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn, lo, hi = 0, math.inf, -math.inf
    for i, (name, rows) in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        for j, key in enumerate(spec.keys):
            xs, ys = series(rows, key)
            if not xs:
                continue
            lo, hi = min(lo, *ys), max(hi, *ys)
            label = name if j == 0 else f"{name} ({key.rsplit('_', 1)[-1]})"
            style = "-" if j == 0 else "--"
            if spec.points or len(xs) < 3:
                ax.plot(xs, ys, style, color=color, marker="o", markersize=4, linewidth=1.2, label=label)
            elif len(xs) > SMOOTH_ABOVE:
                ax.plot(xs, ys, style, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, ema(ys, len(xs) / 20), style, color=color, linewidth=1.6, label=label)
            else:
                ax.plot(xs, ys, style, color=color, linewidth=1.5, label=label)
            drawn += 1
    if not drawn:
        return None
    ax.set_title(spec.title, fontsize=11, loc="left")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(spec.ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(True, color="#e5e5e5", linewidth=0.7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if hi - lo < 1e-12:  # a flat line: a readable range instead of ticks that differ in the 4th digit
        ax.set_ylim(*flat_range(lo, spec.rate))
    if spec.rate:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    if len(runs) > 1 or len(spec.keys) > 1:
        ax.legend(fontsize=8, frameon=False)
    # fixed margins, wide enough for 7-character tick labels: a layout engine would double the time
    fig.subplots_adjust(left=0.14, right=0.98, top=0.9, bottom=0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")
