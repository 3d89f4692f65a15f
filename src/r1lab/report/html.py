"""One self-contained HTML page for one or more run directories: curves, evaluations, cost, traces.

    from r1lab.report import write_report
    write_report(["runs/grpo-tiny"], "runs/grpo-tiny/report.html", price_per_hour=0.10)

Everything is inside the file: plots are base64 PNGs, the style sheet is inline, nothing is loaded
from the network, so the page can be mailed, archived or opened offline. Every text that came from
a run (model output, answers, paths) is HTML-escaped: a completion containing `<script>` is shown,
never run.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from pathlib import Path

from r1lab.report.data import RunData, Trace, load_run, run_names
from r1lab.report.plots import COLORS, plot_png, specs_for
from r1lab.report.tables import Table, cost_table, eval_table, overview_table

TRACE_CHARS = 6000  # longer completions are cut in the page (the samples file has them whole)

CSS = """
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #f6f7f9; --ok: #067647; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
main { max-width: 1220px; margin: 0 auto; padding: 28px 24px 60px; }
header h1 { margin: 0 0 4px; font-size: 26px; letter-spacing: -0.01em; }
header p { margin: 0; color: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 14px; margin: 12px 0 0; padding: 0; list-style: none; }
.legend li { display: flex; align-items: center; gap: 6px; font-weight: 600; }
.swatch { width: 14px; height: 4px; border-radius: 2px; display: inline-block; }
section { margin-top: 30px; }
h2 { font-size: 18px; margin: 0 0 10px; }
.note { color: var(--muted); font-size: 13px; margin: -4px 0 10px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 7px 12px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: #fafbfc; font-weight: 600; color: #344054; font-size: 13px; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
#runs-table td:nth-child(2) { white-space: normal; word-break: break-all; color: var(--muted); font-size: 12.5px; }
#cost-table td:nth-child(2) { white-space: normal; min-width: 200px; }
#runs-table td:nth-child(3) { color: var(--muted); font-size: 12.5px; }
tbody tr:nth-child(even) { background: #fcfcfd; }
tbody tr:last-child td { border-bottom: 0; }
details { background: #fff; border: 1px solid var(--line); border-radius: 10px; margin-bottom: 10px; }
summary { cursor: pointer; padding: 10px 14px; display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
.badge { font-weight: 700; font-size: 12px; padding: 2px 8px; border-radius: 999px; color: #fff; }
.badge.ok { background: var(--ok); } .badge.bad { background: var(--bad); } .badge.unk { background: var(--muted); }
.meta { color: var(--muted); font-size: 13px; }
.meta b { color: var(--fg); font-weight: 600; }
pre { margin: 0; padding: 12px 14px; border-top: 1px solid var(--line); white-space: pre-wrap; word-break: break-word;
      font: 12.5px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; max-height: 420px; overflow: auto; }
.empty { color: var(--muted); font-style: italic; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _table(table: Table, table_id: str) -> str:
    header, rows = table
    if not rows:
        return '<p class="empty">nothing recorded</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="card"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _figures(runs: list[RunData]) -> str:
    named = [(r.name, r.metrics) for r in runs]
    figs = []
    for spec in specs_for([r.metrics for r in runs]):
        png = plot_png(spec, named)
        if png is not None:
            alt = escape(spec.title)
            figs.append(
                f'<figure data-metric="{escape(spec.key)}"><img alt="{alt}" src="data:image/png;base64,{png}"></figure>'
            )
    if not figs:
        return '<p class="empty">no metrics.jsonl with step metrics in these runs</p>'
    return f'<div class="grid">{"".join(figs)}</div>'


def _trace(run: RunData, t: Trace) -> str:
    badge = {True: ("ok", "correct"), False: ("bad", "incorrect"), None: ("unk", "ungraded")}[t.correct]
    meta = [f"<b>{escape(run.name)}</b>", escape(t.source)]
    if t.step is not None:
        meta.append(f"step {t.step}")
    meta.append(f"answer <b>{escape(t.answer) if t.answer is not None else '&mdash;'}</b>")
    if t.reference is not None:
        meta.append(f"reference <b>{escape(t.reference)}</b>")
    if t.score is not None:
        meta.append(f"reward {t.score:.3g}")
    if t.parts:
        meta.append(", ".join(f"{escape(k)} {v:.3g}" for k, v in t.parts.items()))
    text = (
        t.text
        if len(t.text) <= TRACE_CHARS
        else t.text[:TRACE_CHARS] + f"\n[... {len(t.text) - TRACE_CHARS} more characters]"
    )
    return (
        f'<details class="trace"><summary><span class="badge {badge[0]}">{badge[1]}</span>'
        f'<span class="meta">{" &middot; ".join(meta)}</span></summary><pre>{escape(text)}</pre></details>'
    )


def render(runs: list[RunData], price_per_hour: float | None) -> str:
    """The whole page as a string."""
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    legend = "".join(
        f'<li><span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>{escape(r.name)}</li>'
        for i, r in enumerate(runs)
    )
    traces = (
        "".join(_trace(r, t) for r in runs for t in r.traces) or '<p class="empty">no samples recorded</p>'
    )
    price_note = (
        f"Dollars at {escape(f'${price_per_hour:g}')} per hour of the machine the run used."
        if price_per_hour is not None
        else "No price given (r1lab report --price-per-hour X): dollars are not shown."
    )
    title = "r1lab report: " + ", ".join(r.name for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body><main>
<header><h1>r1lab report</h1><p>{len(runs)} run{"s" if len(runs) != 1 else ""} &middot; generated {now}</p>
<ul class="legend">{legend}</ul></header>
<section id="runs"><h2>Runs</h2>{_table(overview_table(runs), "runs-table")}</section>
<section id="curves"><h2>Training curves</h2>
<p class="note">One colour per run. Long noisy curves are drawn faint with a moving average on top.</p>
{_figures(runs)}</section>
<section id="eval"><h2>Evaluation</h2>
<p class="note">pass@1 is averaged over k samples per problem (avg@k); maj@k is the majority answer's accuracy;
pass@k the unbiased estimate that one of k samples is right.</p>
{_table(eval_table(runs), "eval-table")}</section>
<section id="cost"><h2>Cost</h2>
<p class="note">FLOPs count 2N per generated or prompt token and 6N per trained token. {price_note}</p>
{_table(cost_table(runs, price_per_hour), "cost-table")}</section>
<section id="traces"><h2>Example traces</h2>
<p class="note">A few correct and incorrect completions from the latest samples of each run (click to open).</p>
{traces}</section>
<footer>Written by r1lab. Self-contained: no scripts, no network.</footer>
</main></body></html>
"""


def write_report(
    run_dirs: list[str | Path], out_path: str | Path, price_per_hour: float | None = None
) -> Path:
    """Read the run directories and write the report to `out_path`; returns the path written."""
    if not run_dirs:
        raise ValueError("write_report: no run directories")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, run_names(paths), strict=True)]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs, price_per_hour), encoding="utf-8")
    return out
