"""Rejection sampling: k teacher samples per problem, graded by the shared grader, the verified ones kept.

This is how DeepSeek-R1 built its SFT data (and how its distilled models were made): sample several
reasoning traces per problem from a strong model, keep only those whose final answer the rule-based
verifier accepts (`r1lab.rewards.grade`, the grader RL and evaluation use), drop duplicates, and
fine-tune on what is left. A trace is kept when its accuracy part is 1 (the answer is right), it
was not cut off by `max_tokens`, and (by default) its `<think>` block is well formed. Duplicates are
detected per problem on whitespace-normalised text.

The output is chat-format JSONL, so `r1lab sft` reads it directly:
    {"messages": [...the problem's prompt..., {"role": "assistant", "content": "<think>..."}],
     "meta": {"problem_id", "sample_index", "teacher", "score", "parts", "answer", "reference",
              "tokens", "finish_reason"}}

Resumable by construction: every kept trace is appended and fsynced on its own, and a problem is
recorded as done in `<output stem>.progress.jsonl` only after all its traces are on disk. On a
re-run the existing traces are read back (a line torn by a kill is cut off first), done problems
are skipped, and a problem that was interrupted half-way is sampled again with its already-kept
texts counting as duplicates. So an interruption at any moment neither loses nor duplicates a kept
trace. A problem with failed samples (an HTTP teacher that gave up on some requests) is not marked
done, so the next run retries it.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from r1lab.chat import THINK_OPEN
from r1lab.rewards import grade
from r1lab.rewards.base import Reward
from r1lab.rollout.base import Completion, Sampler, SamplingParams
from r1lab.sft.config import SampleConfig
from r1lab.sft.data import TraceError
from r1lab.tasks.base import Problem


@dataclass
class Tally:
    """What happened to one problem's samples."""

    total: int = 0  # samples drawn
    accepted: int = 0  # verified correct (and well formed when required)
    kept: int = 0  # accepted, new and under max_keep: written to the output
    duplicates: int = 0  # accepted but already kept for this problem
    failed: int = 0  # never delivered by the teacher (HTTP errors after retries)

    def add(self, other: Tally) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def normalise(text: str) -> str:
    """The dedup key of a trace: whitespace collapsed.

    >>> normalise("  <think>a\\n b</think> 4 ")
    '<think>a b</think> 4'
    """
    return " ".join(text.split())


def progress_path(output: str | Path) -> Path:
    """`runs/x/traces.jsonl` -> `runs/x/traces.progress.jsonl` (the per-problem done records)."""
    p = Path(output)
    return p.with_name(f"{p.stem}.progress.jsonl")


def repair_tail(path: Path) -> int:
    """Cut a last line that a kill left without its newline; returns the bytes removed."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


class JsonlAppender:
    """Append-only JSONL where each record is flushed and fsynced before `write` returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise TraceError(
                f"{path}:{n}: invalid JSON in an existing output; fix or delete the file"
            ) from None
    return rows


def read_state(output: Path) -> tuple[dict[str, set[str]], set[str]]:
    """What an earlier run left: kept dedup keys per problem id, and the ids of finished problems."""
    repair_tail(output)
    repair_tail(progress_path(output))
    kept: dict[str, set[str]] = defaultdict(set)
    for n, row in enumerate(_read_jsonl(output), start=1):
        try:
            kept[row["meta"]["problem_id"]].add(normalise(row["messages"][-1]["content"]))
        except (KeyError, TypeError, IndexError):
            raise TraceError(
                f"{output}:{n}: field 'meta.problem_id': missing; not an r1lab sample output"
            ) from None
    done = {row["problem_id"] for row in _read_jsonl(progress_path(output)) if "problem_id" in row}
    return kept, done


def is_accepted(completion: Completion, reward: Reward, require_format: bool) -> bool:
    """Verified right, not truncated, and well formed when asked."""
    if completion.finish_reason != "stop":
        return False
    if reward.parts.get("accuracy", 0.0) < 1.0:
        return False
    return not require_format or reward.parts.get("format", 0.0) >= 1.0


def completion_tokens(c: Completion) -> int | None:
    """Tokens of a completion: the engine's ids, or the count an HTTP server reported."""
    return len(c.token_ids) if c.token_ids else getattr(c, "completion_tokens", None)


def grade_completion(c: Completion, problem: Problem, cfg: SampleConfig) -> Reward:
    spec = cfg.reward
    n_tokens = completion_tokens(c)
    if n_tokens is None and spec.overlong_buffer > 0:
        spec = spec.model_copy(update={"overlong_buffer": 0})  # unknown length: no length shaping
    return grade(c.text, problem, spec, n_tokens=n_tokens, max_tokens=cfg.sampling.max_tokens)


def trace_row(problem: Problem, c: Completion, reward: Reward, index: int, teacher: str) -> dict:
    """One output record: the chat messages and where the trace came from."""
    meta = {
        "problem_id": problem.id,
        "sample_index": index,
        "teacher": teacher,
        "score": reward.score,
        "parts": reward.parts,
        "answer": reward.answer,
        "reference": problem.reference,
        "tokens": completion_tokens(c),
        "finish_reason": c.finish_reason,
    }
    return {"messages": [*problem.messages, {"role": "assistant", "content": c.text}], "meta": meta}


def _params(cfg: SampleConfig, seed: int) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(s.temperature, s.top_p, s.max_tokens, tuple(s.stop), seed=seed)


def sample_traces(cfg: SampleConfig, sampler: Sampler, problems: list[Problem], echo=print) -> dict:
    """Sample, grade, dedup and append the kept traces (see the module docstring); returns the summary."""
    output = Path(cfg.output)
    kept_keys, done = read_state(output)
    order = {p.id: i for i, p in enumerate(problems)}
    pending = [p for p in problems if p.id not in done]
    if done or kept_keys:
        n_kept = sum(len(v) for v in kept_keys.values())
        echo(f"resuming {output}: {len(problems) - len(pending)} problems done, {n_kept} traces kept")
    teacher = cfg.teacher.name()
    traces, progress = JsonlAppender(output), JsonlAppender(progress_path(output))
    total, t0 = Tally(), time.monotonic()
    try:
        for start in range(0, len(pending), cfg.problems_per_call):
            chunk = pending[start : start + cfg.problems_per_call]
            # seeded by the chunk's first problem, so a fresh run is reproducible chunk by chunk
            params = _params(cfg, cfg.seed * 1_000_003 + order[chunk[0].id])
            completions = sampler.generate([p.messages for p in chunk], cfg.k, params)
            for i, problem in enumerate(chunk):
                tally = Tally()
                keys = kept_keys[problem.id]
                for j, c in enumerate(completions[i * cfg.k : (i + 1) * cfg.k]):
                    tally.total += 1
                    if c.finish_reason == "error":
                        tally.failed += 1
                        continue
                    if cfg.teacher.think_in_prompt and not c.text.lstrip().startswith(THINK_OPEN):
                        c.text = THINK_OPEN + c.text  # the prompt opened the block; the trace needs it
                    reward = grade_completion(c, problem, cfg)
                    if not is_accepted(c, reward, cfg.require_format):
                        continue
                    tally.accepted += 1
                    key = normalise(c.text)
                    if key in keys:
                        tally.duplicates += 1
                        continue
                    if cfg.max_keep is not None and len(keys) >= cfg.max_keep:
                        continue
                    traces.write(trace_row(problem, c, reward, j, teacher))
                    keys.add(key)
                    tally.kept += 1
                if tally.failed == 0:
                    progress.write({"problem_id": problem.id, **asdict(tally)})
                total.add(tally)
                if cfg.progress:
                    echo(_problem_line(problem.id, tally))
    finally:
        traces.close()
        progress.close()
    seconds = time.monotonic() - t0
    summary = {
        "output": str(output),
        "problems": len(problems),
        "sampled_problems": len(pending),
        **asdict(total),
        "acceptance_rate": total.accepted / max(total.total - total.failed, 1),
        "kept_total": sum(len(v) for v in kept_keys.values()),
        "seconds": seconds,
    }
    stats = getattr(sampler, "stats", None)
    if stats:
        summary["http"] = dict(stats)
    return summary


def build_teacher(cfg: SampleConfig) -> Sampler:
    """The teacher as a `Sampler`: the CPU engine over a local checkpoint, or an HTTP endpoint."""
    t = cfg.teacher
    if t.kind == "http":
        from r1lab.rollout.http import HTTPSampler

        return HTTPSampler(
            t.base_url,
            t.model,
            api_key_env=t.api_key_env,
            max_concurrency=t.max_concurrency,
            timeout_s=t.timeout_s,
            max_retries=t.max_retries,
            use_n=t.use_n,
            seed=cfg.seed,
        )
    import torch

    from r1lab.modeling import load_model
    from r1lab.rollout.cpu import CPUEngine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(t.path)
    return CPUEngine(model, tokenizer, dtype=t.dtype, seed=cfg.seed)


def _problem_line(pid: str, t: Tally) -> str:
    rate = t.accepted / max(t.total - t.failed, 1)
    line = f"{pid}: kept {t.kept}/{t.total}  accepted {t.accepted}/{t.total - t.failed} ({rate:.0%})"
    if t.duplicates:
        line += f"  duplicates {t.duplicates}"
    if t.failed:
        line += f"  failed {t.failed} (retried on the next run)"
    return line
