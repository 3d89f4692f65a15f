"""The HTML report in headless Chromium (Debian's package, driven by Playwright): two synthetic runs,
every plot image decodes, the tables have their rows, a trace opens; a screenshot is saved (pytest tmp
dir, copied to runs/screenshots/report.png)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from browser_support import ARGS, CHROMIUM

from r1lab.report import write_report

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs it)"),
]


def synthetic_run(path: Path, steps: int, rate: float, kl: bool) -> Path:
    """A GRPO-like run: accuracy rising at `rate`, lengths growing, held-out evals every 25 steps."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"model: runs/base/checkpoints/step_300\nrl: {{steps: {steps}}}\n")
    rows = []
    for s in range(1, steps + 1):
        acc = 0.15 + 0.7 * (1 - math.exp(-s * rate)) + 0.06 * math.sin(1.7 * s)
        row = {
            "step": s, "reward": acc + 0.1 * 0.9, "reward/accuracy": acc, "reward/format": 0.9, "accuracy": acc,
            "response_len_mean": 22 + 20 * (1 - math.exp(-s * rate)) + math.sin(s), "response_len_max": 64,
            "reflection_rate": 0.15 * math.exp(-s / 60), "entropy": 0.9 / (1 + s * rate), "clip_frac": 0.01,
            "kl": 0.02 * (1 - math.exp(-s / 40)) if kl else 0.0, "tokens": 4000, "rollout_time": 0.6,
            "step_time": 1.1, "elapsed": 1.1 * s, "flops": 3.0e10,
        }  # fmt: skip
        if s % 25 == 0:
            row["eval/pass@1"] = acc - 0.04
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "samples").mkdir()
    traces = [
        {"text": "<think>4821 + 1377: 1+7=8, 2+7=9, 8+3=11 carry 1, 4+1+1=6</think> \\boxed{6198}",
         "score": 1.1, "parts": {"accuracy": 1.0, "format": 1.0}, "answer": "6198"},
        {"text": "<think>4821 + 1377 = 6188 wait, check: 2+7=9 so 6198?</think> \\boxed{6188} <b>bold?</b>",
         "score": 0.1, "parts": {"accuracy": 0.0, "format": 1.0}, "answer": "6188"},
    ]  # fmt: skip
    (path / "samples" / f"step_{steps}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    summary = {"task": "arithmetic", "n_problems": 200, "k": 4, "pass@1": acc, "maj@4": acc + 0.05,
               "pass@4": min(1.0, acc + 0.12), "response_len_mean": 40.0, "format_rate": 0.93,
               "truncation_rate": 0.0, "wall_time_s": 9.5, "generated_tokens": 32000}  # fmt: skip
    (path / "eval.json").write_text(json.dumps({"summary": summary}))
    est = {
        "workload": {"gen_tokens": 4000 * steps}, "flops": {"total": 3.2e10 * steps},
        "here": {"seconds": 1.2 * steps, "gen_seconds": 0.7 * steps},
        "gpu": {"gpu": "H100 SXM", "n_gpus": 1, "mfu": 0.4, "price_per_hour": 3.0, "seconds": 0.05,
                "dollars": 4e-5, "dollars_per_million_generated": 2e-4},
    }  # fmt: skip
    (path / "estimate.json").write_text(json.dumps(est))
    return path


def test_report_renders_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    a = synthetic_run(tmp_path / "grpo", steps=150, rate=0.04, kl=True)
    b = synthetic_run(tmp_path / "dr-grpo", steps=150, rate=0.07, kl=False)
    out = write_report([a, b], tmp_path / "report.html", price_per_hour=0.1)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            loaded = page.evaluate(
                "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"
            )
            total = page.evaluate("document.images.length")
            assert total == 10 and loaded == total  # reward, 2 parts, accuracy, eval, length, reflection, ...
            rows = {
                t: page.locator(f"#{t} tbody tr").count() for t in ("runs-table", "eval-table", "cost-table")
            }
            # per run: eval.json and the last held-out eval in metrics.jsonl; cost: actual, estimate
            # here, estimate on a GPU
            assert rows == {"runs-table": 2, "eval-table": 4, "cost-table": 6}
            assert page.locator("#runs-table").inner_text().count("150") == 2
            trace = page.locator("details.trace").nth(1)
            trace.locator("summary").click()
            assert "<b>bold?</b>" in trace.locator("pre").inner_text()  # shown as text, not markup
            assert page.locator("details.trace b", has_text="bold?").count() == 0
            assert not errors
            assert all(u.startswith(("file:", "data:")) for u in requests)  # nothing from the network
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    dest = REPO / "runs" / "screenshots"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, dest / "report.png")
    assert shot.stat().st_size > 50_000
