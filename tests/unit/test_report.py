"""The HTML report on synthetic run directories: plots, tables, escaped traces, clear errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from r1lab.cli import main
from r1lab.report import ReportError, load_run, write_report
from r1lab.report.tables import actual_cost, cost_table, eval_table

STEPS = 80


def fake_run(path: Path, steps: int = STEPS, seed: float = 0.0, eval_file: bool = True) -> Path:
    """A run directory like the GRPO loop writes: metrics.jsonl, samples, summary, estimate, eval."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: runs/base/checkpoints/step_300\nrl: {steps: 80}\n")
    rows = []
    for s in range(1, steps + 1):
        acc = 0.2 + 0.6 * (1 - math.exp(-s / 20)) + 0.05 * math.sin(s + seed)
        row = {
            "step": s, "reward": acc + 0.1, "reward/accuracy": acc, "reward/format": 0.9, "accuracy": acc,
            "format_rate": 0.9, "response_len_mean": 20 + s / 4, "response_len_max": 40 + s / 2,
            "reflection_rate": 0.1, "entropy": 1.0 / (1 + s / 30), "kl": 0.001 * s, "clip_frac": 0.02,
            "tokens": 1000, "rollout_time": 0.5, "step_time": 1.0, "elapsed": float(s), "flops": 1e10, "lr": 1e-4,
        }  # fmt: skip
        if s % 20 == 0:
            row["eval/pass@1"] = acc - 0.05
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 81, "rew')
    (path / "samples").mkdir()
    samples = [
        {"prompt_index": 0, "text": "<think>12+30=42</think> \\boxed{42}", "score": 1.0,
         "parts": {"accuracy": 1.0, "format": 1.0}, "answer": "42"},
        {"prompt_index": 1, "text": "<think>oops <script>alert(1)</script></think> 41", "score": 0.0,
         "parts": {"accuracy": 0.0, "format": 1.0}, "answer": "41"},
    ]  # fmt: skip
    for step in (20, 80):
        (path / "samples" / f"step_{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    (path / "summary.json").write_text(json.dumps({"step": steps, "eval/pass@1": 0.71, "eval/maj@4": 0.8}))
    if eval_file:
        summary = {"task": "arithmetic", "n_problems": 200, "k": 4, "pass@1": 0.7, "maj@4": 0.78, "pass@4": 0.9,
                   "response_len_mean": 31.0, "format_rate": 0.95, "truncation_rate": 0.01, "wall_time_s": 12.0,
                   "generated_tokens": 24800}  # fmt: skip
        (path / "eval_final.json").write_text(json.dumps({"summary": summary, "problems": []}))
    est = {
        "workload": {"gen_tokens": 80000}, "flops": {"total": 9e11},
        "here": {"seconds": 70.0, "gen_seconds": 30.0},
        "gpu": {"gpu": "H100 SXM", "n_gpus": 1, "mfu": 0.4, "price_per_hour": 3.0, "seconds": 0.01,
                "dollars": 1e-5, "dollars_per_million_generated": 1e-4},
    }  # fmt: skip
    (path / "estimate.json").write_text(json.dumps(est))
    return path


def test_report_has_every_plot_and_table(tmp_path):
    run = fake_run(tmp_path / "grpo")
    out = write_report([run], tmp_path / "report.html", price_per_hour=0.36)
    html = out.read_text()
    metrics = re.findall(r'<figure data-metric="([^"]+)"><img', html)
    assert metrics == [
        "reward", "reward/accuracy", "reward/format", "accuracy", "eval/pass@1", "response_len_mean",
        "reflection_rate", "entropy", "kl", "clip_frac",
    ]  # fmt: skip
    assert html.count('src="data:image/png;base64,') == len(metrics)
    for table in ("runs-table", "eval-table", "cost-table"):
        assert f'id="{table}"' in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained, inert
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # model output escaped
    assert html.count('class="trace"') == 2  # the right and the wrong one of the newest step file
    assert "step 80" in html and "step 20" not in html


def test_eval_and_cost_tables(tmp_path):
    run = load_run(fake_run(tmp_path / "grpo"))
    assert len(run.metrics) == STEPS  # the torn last line is skipped
    header, rows = eval_table([run])
    assert header[5:8] == ["pass@1", "maj@4", "pass@4"]
    assert [r[1] for r in rows] == ["summary.json (held-out)", "eval_final"]
    assert rows[1][5:8] == ["70.0%", "78.0%", "90.0%"]
    actual = actual_cost(run)
    assert actual == {"flops": STEPS * 1e10, "seconds": float(STEPS), "gen_tokens": STEPS * 1000.0,
                      "gen_seconds": STEPS * 0.5}  # fmt: skip
    header, rows = cost_table([run], price_per_hour=3.6)
    assert [r[1] for r in rows][:2] == ["actual", "estimate, here"] and rows[2][1].startswith(
        "estimate, 1 x H100"
    )
    assert rows[0][6] == "$0.08"  # 80 s at $3.60/h
    # generation: 40 s at $3.60/h = $0.04 for 80k tokens -> $0.50 per million
    assert rows[0][7] == "$0.50"


def test_resumed_run_sums_step_times(tmp_path):
    run = load_run(fake_run(tmp_path / "grpo"))
    for i, row in enumerate(run.metrics):
        row["elapsed"] = float(i % 40)  # the clock restarted at step 41
    assert actual_cost(run)["seconds"] == pytest.approx(STEPS * 1.0)


def test_several_runs_overlay_and_sparse_runs_skip_plots(tmp_path):
    a = fake_run(tmp_path / "a" / "run")
    b = tmp_path / "b" / "run"
    b.mkdir(parents=True)
    (b / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in range(1, 11))
    )
    html = write_report([a, b], tmp_path / "both.html").read_text()
    assert "a/run" in html and "b/run" in html  # same directory names: parents tell them apart
    assert html.count("<figure") == 10  # b adds no plot of its own; it shares "reward"
    assert "No price given" in html


def test_eval_only_directory(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    summary = {"n_problems": 3, "k": 2, "pass@1": 0.5, "maj@2": 0.66, "pass@2": 0.8, "wall_time_s": 7.2,
               "generated_tokens": 3600}  # fmt: skip
    (d / "eval.json").write_text(json.dumps({"summary": summary}))
    rec = {"problem_id": "p0", "text": "<think>x</think> 3", "answer": "3", "reference": "3", "correct": True}
    (d / "samples.jsonl").write_text(json.dumps(rec) + "\n")
    html = write_report([d], d / "report.html", price_per_hour=1.0).read_text()
    assert "no metrics.jsonl" in html and "reference <b>3</b>" in html
    _, rows = cost_table([load_run(d)], 1.0)
    assert rows[0][3] == "7.2 s" and rows[0][7] == "$0.56"  # $0.002 for 3600 tokens


def test_missing_run_directory_is_one_line(tmp_path, capsys):
    with pytest.raises(ReportError, match="no such run directory"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such run directory" in err


def test_report_command_default_output(tmp_path, capsys):
    run = fake_run(tmp_path / "grpo")
    assert main(["report", str(run), "--price-per-hour", "0.5"]) == 0
    assert (run / "report.html").is_file() and "wrote" in capsys.readouterr().out


def test_held_out_row_from_metrics_when_there_is_no_summary(tmp_path):
    run_dir = fake_run(tmp_path / "grpo", eval_file=False)
    (run_dir / "summary.json").unlink()
    run = load_run(run_dir)
    header, rows = eval_table([run])
    assert [r[1] for r in rows] == ["held-out, step 80"]
    assert rows[0][header.index("pass@1")] == f"{100 * run.metrics[79]['eval/pass@1']:.1f}%"
