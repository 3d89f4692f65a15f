"""Evaluate a sampler on a list of problems: k samples each, graded by the same `grade` RL uses.

    result = evaluate(engine, problems, k=4, params=SamplingParams(temperature=0.6, max_tokens=256),
                      reward=RewardSpec())
    print(result.summary["pass@1"], result.summary["maj@4"])
    write_eval(result, "runs/eval-gsm8k")          # eval.json (summary) + samples.jsonl

What it reports (see `r1lab.eval.metrics` for the definitions): pass@1 averaged over the k samples
(avg@k), maj@k, pass@k for each requested k, mean/max response length in tokens, the rate of
well-formed `<think>` completions, of completions with an extracted answer, of completions cut at
`max_tokens`, and wall time. Every sample is kept as a record (problem id, sample index, text,
extracted answer, reward parts, tokens, finish reason) so a report can show real traces.

Majority vote groups answers by their normalised text, and all answers the verifier graded correct
form one group (each equals the reference, hence each other). Wrong answers that are equal only
mathematically ("1/2" and "0.5", both wrong) stay separate groups, which can only help the correct
answer win: maj@k is, if anything, slightly optimistic on free-form math.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1lab.config import R1labError, RewardSpec
from r1lab.eval.metrics import aggregate, ks_for, majority_vote, normalise_answer
from r1lab.rewards.base import Reward
from r1lab.rollout.base import Completion, Sampler, SamplingParams
from r1lab.tasks.base import Problem


class EvalError(R1labError):
    """An evaluation that cannot produce numbers (e.g. an endpoint delivered no sample at all)."""


#: grade(text, problem, spec=..., n_tokens=..., max_tokens=...) -> Reward; `r1lab.rewards.grade` by default
Grader = Callable[..., Reward]


@dataclass(frozen=True)
class SampleRecord:
    """One graded completion (a line of `samples.jsonl`)."""

    problem_id: str
    sample_index: int
    text: str  # the completion as graded (HTTP engines already put split-off reasoning back in <think>)
    answer: str | None  # the answer the verifier extracted
    reference: str
    correct: bool  # the verifier's accuracy part is positive
    score: float  # total reward under the RewardSpec
    parts: dict[str, float]
    n_tokens: int | None  # completion tokens (None: an endpoint that reported no usage)
    finish_reason: str  # "stop", "length", or "error" (an endpoint never delivered it; not graded)
    well_formed: bool  # <think>...</think> then a non-empty answer: the grader's format part is positive


@dataclass(frozen=True)
class ProblemResult:
    """Per-problem outcome: how many samples were graded and right, and the majority answer."""

    problem_id: str
    n_samples: int  # graded samples (k, less any an endpoint never delivered)
    n_correct: int
    maj_answer: str | None
    maj_votes: int
    maj_correct: bool


@dataclass
class EvalResult:
    summary: dict[str, Any]
    samples: list[SampleRecord] = field(default_factory=list)
    problems: list[ProblemResult] = field(default_factory=list)


def completion_tokens(c: Completion) -> int | None:
    """Completion length in tokens: the token ids, or the server's usage count for HTTP engines."""
    if c.token_ids:
        return len(c.token_ids)
    usage = getattr(c, "completion_tokens", None)  # HTTPCompletion: no ids come back, only a count
    return usage if usage is not None else (0 if not c.text else None)


def is_correct(reward: Reward) -> bool:
    """A sample is correct when the verifier's accuracy part is positive (whatever its weight)."""
    return reward.parts.get("accuracy", 0.0) > 0.0


def vote(problem_id: str, records: Sequence[SampleRecord]) -> ProblemResult:
    """Majority vote over one problem's graded samples; correct answers form one group (module docstring)."""
    graded = [r for r in records if r.finish_reason != "error"]
    correct_keys = {normalise_answer(r.answer) for r in graded if r.correct and r.answer is not None}

    def both_correct(a: str, b: str) -> bool:
        return normalise_answer(a) in correct_keys and normalise_answer(b) in correct_keys

    v = majority_vote([r.answer for r in graded], equivalent=both_correct)
    # the voted answer is correct if the verifier accepted it in any of the samples that gave it
    maj_correct = any(graded[i].correct for i in v.members)
    return ProblemResult(
        problem_id, len(graded), sum(r.correct for r in graded), v.answer, v.votes, maj_correct
    )


def _grade_chunk(
    chunk: Sequence[Problem],
    completions: Sequence[Completion],
    k: int,
    params: SamplingParams,
    reward: RewardSpec,
    grader: Grader,
) -> list[SampleRecord]:
    if len(completions) != len(chunk) * k:
        raise RuntimeError(f"sampler returned {len(completions)} completions for {len(chunk)} prompts x {k}")
    records = []
    for i, c in enumerate(completions):
        problem, j = chunk[i // k], i % k  # completion i*k + j is sample j of prompt i (Sampler contract)
        text, n_tokens = c.text, completion_tokens(c)
        if c.finish_reason == "error":  # an endpoint gave up on this sample: it is not graded
            r = Reward(0.0, {}, None)
        else:
            r = grader(text, problem, spec=reward, n_tokens=n_tokens or 0, max_tokens=params.max_tokens)
        records.append(
            SampleRecord(
                problem_id=problem.id,
                sample_index=j,
                text=text,
                answer=r.answer,
                reference=problem.reference,
                correct=is_correct(r),
                score=float(r.score),
                parts={k_: float(v) for k_, v in r.parts.items()},
                n_tokens=n_tokens,
                finish_reason=c.finish_reason,
                well_formed=r.parts.get("format", 0.0) > 0.0,  # grade() parses once, with r1lab.chat
            )
        )
    return records


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarize(
    samples: Sequence[SampleRecord],
    problems: Sequence[ProblemResult],
    k: int,
    ks: Sequence[int],
    wall_time_s: float,
) -> dict[str, Any]:
    """The headline numbers of an evaluation (what `eval.json` holds)."""
    graded = [s for s in samples if s.finish_reason != "error"]
    lengths = [s.n_tokens for s in graded if s.n_tokens is not None]
    tokens = sum(lengths)
    out: dict[str, Any] = {"n_problems": len(problems), "k": k}
    out.update(
        aggregate([(p.n_samples, p.n_correct) for p in problems], [p.maj_correct for p in problems], k, ks)
    )
    out.update(
        response_len_mean=tokens / len(lengths) if lengths else None,
        response_len_max=max(lengths) if lengths else None,
        format_rate=_rate([s.well_formed for s in graded]),
        answer_rate=_rate([s.answer is not None for s in graded]),
        truncation_rate=_rate([s.finish_reason == "length" for s in graded]),
        error_rate=(len(samples) - len(graded)) / len(samples),
        generated_tokens=tokens,
        wall_time_s=wall_time_s,
        tokens_per_s=tokens / wall_time_s if wall_time_s > 0 else 0.0,
    )
    return out


def evaluate(
    sampler: Sampler,
    problems: Sequence[Problem],
    k: int,
    params: SamplingParams,
    reward: RewardSpec | None = None,
    ks: Sequence[int] | None = None,
    progress: bool = True,
    batch_prompts: int = 16,
    grader: Grader | None = None,
) -> EvalResult:
    """Sample k completions per problem (in chunks of `batch_prompts` prompts), grade, vote, summarise.

    `ks` are the pass@k values to report (default: 1 and k). `grader` defaults to `r1lab.rewards.grade`,
    the function RL rewards with; tests pass a fake. With `params.seed` set, chunk i samples with
    seed + i, so a rerun reproduces and chunks do not repeat each other's randomness.
    """
    if not problems:
        raise ValueError("evaluate: no problems")
    if k < 1 or batch_prompts < 1:
        raise ValueError(
            f"evaluate: k and batch_prompts must be >= 1 (got k={k}, batch_prompts={batch_prompts})"
        )
    if grader is None:
        from r1lab.rewards import grade as grader
    reward = reward or RewardSpec()
    from tqdm.auto import tqdm

    start = time.perf_counter()
    samples: list[SampleRecord] = []
    bar = tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress, leave=False)
    for ci, lo in enumerate(range(0, len(problems), batch_prompts)):
        chunk = problems[lo : lo + batch_prompts]
        p = params if params.seed is None else SamplingParams(**{**asdict(params), "seed": params.seed + ci})
        completions = sampler.generate([pr.messages for pr in chunk], k, p)
        samples += _grade_chunk(chunk, completions, k, params, reward, grader)
        bar.update(len(chunk))
        acc = sum(s.correct for s in samples) / len(samples)
        bar.set_postfix(pass1=f"{acc:.3f}")
    bar.close()
    wall = time.perf_counter() - start
    if all(s.finish_reason == "error" for s in samples):
        raise EvalError(
            f"evaluate: the sampler delivered none of the {len(samples)} samples (endpoint down?)"
        )
    results = [vote(pr.id, samples[i * k : (i + 1) * k]) for i, pr in enumerate(problems)]
    summary = summarize(samples, results, k, ks_for(k, ks), wall)
    summary["sampling"] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
    }
    return EvalResult(summary, samples, results)


def write_eval(result: EvalResult, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write `eval.json` (summary + per-problem votes) and `samples.jsonl` into `out_dir`.

    With a `tag` the names are `eval_<tag>.json` and `samples_<tag>.jsonl`, so several evaluations
    (tasks, or before/after training) can share one run directory. Returns the summary's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    summary_path = out / f"eval{suffix}.json"
    payload = {"summary": result.summary, "problems": [asdict(p) for p in result.problems]}
    summary_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    with open(out / f"samples{suffix}.jsonl", "w", encoding="utf-8") as f:
        for s in result.samples:
            f.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")
    return summary_path
