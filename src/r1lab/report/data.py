"""Read what a run directory holds, tolerantly: the report shows what is there and skips what is not.

A run directory (see `r1lab.metrics.run`) may hold `config.yaml`, `metrics.jsonl`, `samples/step_N.jsonl`,
`summary.json`, `estimate.json` (from `r1lab estimate --run-dir`), and `eval*.json` + `samples*.jsonl`
(from `r1lab eval` or `r1lab.eval.write_eval`). Only a directory that does not exist is an error;
a torn last line of `metrics.jsonl` (a killed run) is skipped, as a resume would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from r1lab.config import R1labError


class ReportError(R1labError):
    """A run directory that does not exist, or a file in it that is not what its name says."""


@dataclass
class Trace:
    """One completion shown in the report."""

    source: str  # file it came from, relative to the run directory
    text: str
    correct: bool | None  # None: the file does not say
    score: float | None = None
    answer: str | None = None
    reference: str | None = None
    parts: dict[str, float] = field(default_factory=dict)
    step: int | None = None


@dataclass
class RunData:
    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (label, summary)
    summary: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] | None = None
    traces: list[Trace] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a line that is not a JSON object (e.g. torn by a kill) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else -1


def _correct(row: dict[str, Any]) -> bool | None:
    if isinstance(row.get("correct"), bool):
        return row["correct"]
    parts = row.get("parts")
    if isinstance(parts, dict) and isinstance(parts.get("accuracy"), int | float):
        return parts["accuracy"] > 0
    return None


def _trace(row: dict[str, Any], source: str, step: int | None) -> Trace | None:
    text = row.get("text", row.get("completion"))
    if not isinstance(text, str):
        return None
    parts = row.get("parts") if isinstance(row.get("parts"), dict) else {}
    score = row.get("score", row.get("reward"))
    return Trace(
        source=source,
        text=text,
        correct=_correct(row),
        score=float(score) if isinstance(score, int | float) else None,
        answer=row.get("answer") if isinstance(row.get("answer"), str) else None,
        reference=str(row["reference"]) if row.get("reference") is not None else None,
        parts={k: float(v) for k, v in parts.items() if isinstance(v, int | float)},
        step=step,
    )


def load_traces(run: Path, per_kind: int = 2) -> list[Trace]:
    """Up to `per_kind` correct and `per_kind` incorrect traces from the newest RL samples file and
    from each evaluation's samples: real examples of what the model wrote, right and wrong."""
    files: list[tuple[Path, int | None]] = []
    step_files = sorted((run / "samples").glob("*.jsonl"), key=_step_of) if (run / "samples").is_dir() else []
    if step_files:
        files.append((step_files[-1], _step_of(step_files[-1])))
    files += [(p, None) for p in sorted(run.glob("samples*.jsonl"))]
    out = []
    for path, step in files:
        rows = [t for r in read_jsonl(path) if (t := _trace(r, str(path.relative_to(run)), step)) is not None]
        right = [t for t in rows if t.correct is True][:per_kind]
        wrong = [t for t in rows if t.correct is False][:per_kind]
        unknown = [t for t in rows if t.correct is None][: per_kind if not right and not wrong else 0]
        out += right + wrong + unknown
    return out


def _eval_summary(data: Any) -> dict[str, Any]:
    """The summary inside an eval file: `{"summary": {...}}` (r1lab eval) or the flat dict itself."""
    if isinstance(data, dict) and isinstance(data.get("summary"), dict):
        return data["summary"]
    return data if isinstance(data, dict) else {}


def held_out_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """`eval/...` numbers of a run's summary.json (the last held-out evaluation), without the prefix."""
    return {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/")}


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Everything the report needs from one run directory."""
    run = Path(path)
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory")
    data = RunData(name=name or run.name, path=run)
    if (run / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise ReportError(f"{run / 'config.yaml'}: not valid YAML") from None
        data.config = cfg if isinstance(cfg, dict) else {}
    if (run / "metrics.jsonl").is_file():
        data.metrics = read_jsonl(run / "metrics.jsonl")
    if (run / "summary.json").is_file():
        s = _read_json(run / "summary.json")
        data.summary = s if isinstance(s, dict) else {}
    held_out = held_out_from_summary(data.summary)
    if held_out:
        data.evals.append(("summary.json (held-out)", held_out))
    else:  # no summary (yet): the newest held-out evaluation the training loop logged
        last = next((r for r in reversed(data.metrics) if held_out_from_summary(r)), None)
        if last is not None:
            data.evals.append((f"held-out, step {last.get('step', '?')}", held_out_from_summary(last)))
    for p in sorted(run.glob("eval*.json")):
        data.evals.append((p.stem, _eval_summary(_read_json(p))))
    if (run / "estimate.json").is_file():
        est = _read_json(run / "estimate.json")
        data.estimate = est if isinstance(est, dict) else None
    data.traces = load_traces(run)
    return data


def run_names(paths: list[Path]) -> list[str]:
    """Legend names: the directory name, with its parent added where two runs share a name.

    >>> run_names([Path("a/run"), Path("b/run"), Path("c/other")])
    ['a/run', 'b/run', 'other']
    """
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]
