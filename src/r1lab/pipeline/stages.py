"""The four-stage DeepSeek-R1 recipe as one run: cold-start SFT -> RL -> rejection-sampling SFT -> RL.

DeepSeek-R1 (unlike R1-Zero) is trained in four stages, each starting from the previous one's model:
  1. cold start: long, readable chain-of-thought traces are collected (sampled from a teacher, verified,
     kept when they show their working) and the base model is fine-tuned on them;
  2. reasoning RL: GRPO with rule-based rewards, from the cold-start model;
  3. rejection sampling: the stage-2 model writes k samples per training problem, the verified ones are
     kept, and a model is fine-tuned on them. R1 fine-tuned the *base* on these plus other data;
     `rejection.start` picks the base or the stage-2 model (default: the stage-2 model, since a few
     hundred traces are far from R1's 800k), `rejection.include_cold_start` adds the stage-1 traces;
  4. RL again, from the stage-3 model.

Every stage is an existing r1lab stage (`sft.sample.sample_traces`, `sft.train.train`, `rl.grpo.train`)
configured by its own section; the pipeline fills in what links them (each stage's `model` is the
previous stage's output, each `run_dir` a folder under `out`). On a laptop the cold-start teacher is the
base itself sampled many times: its verified samples with a reflection phrase (and at least
`min_tokens` long) are the long traces; `cold_start.sample.teacher` may instead name a stronger local
checkpoint or an OpenAI-compatible endpoint (e.g. DeepSeek's API).

After the base and after every stage the model is evaluated on the same held-out problems (the RL
task's test split, graded by the RL grader). The driver, `r1lab.pipeline.commands.run_pipeline`,
keeps `OUT/pipeline.json` (stages, checkpoints, held-out numbers, wall time and FLOPs: teacher sampling
+ training, evaluation apart) and writes `OUT/report.html`, which overlays the stages' curves.
Resumable by stage: a stage is skipped when `pipeline.json` says it finished, its checkpoint exists and
its settings and start model are unchanged; the first stage not skipped and every later one run afresh
(an interrupted stage starts over). `--restart` reruns everything, the base too.

Run it:  r1lab pipeline recipes/r1-pipeline.yaml [rl1.rl.steps=40 ...] [--restart]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from r1lab.config import R1labError, Section
from r1lab.metrics.emergence import DEFAULT_REFLECTION_WORDS
from r1lab.pretrain import PretrainConfig
from r1lab.quickstart import HeldOut
from r1lab.rl.config import GRPOConfig
from r1lab.sft.config import SampleConfig, SFTConfig, TeacherSpec

#: stage name -> its folder under `out` (numbered, so a directory listing reads in order)
STAGE_DIRS = {"cold_start": "1-cold-start", "rl1": "2-rl", "rejection": "3-rejection-sft", "rl2": "4-rl"}
COLD_START_TRACES = "traces/cold_start.jsonl"  # in the cold-start folder: the traces stage 1 trained on


class PipelineError(R1labError):
    """A stage that cannot continue (e.g. no verified trace to fine-tune on)."""


# --------------------------------------------------------------------------- config


class StageSFT(SFTConfig):
    """An SFT stage; `model`, `data` and `run_dir` are set by the pipeline."""

    model: str = Field("", description="set by the pipeline: the stage's start model")
    run_dir: str = Field("", description="set by the pipeline: OUT/<stage>")


class StageSample(SampleConfig):
    """Trace sampling of an SFT stage; `output` (and the rejection stage's teacher) set by the pipeline."""

    teacher: TeacherSpec | None = Field(
        None,
        description="cold start: who writes the traces (None: the base model itself); "
        "rejection: leave unset, the stage-2 RL model is the teacher",
    )
    output: str = Field("", description="set by the pipeline: OUT/<stage>/traces/sampled.jsonl")


class StageGRPO(GRPOConfig):
    """An RL stage; `model` and `run_dir` are set by the pipeline."""

    model: str = Field("", description="set by the pipeline: the previous stage's model")
    run_dir: str = Field("", description="set by the pipeline: OUT/<stage>")


class ColdStart(Section):
    """Stage 1: a few verified long traces, then SFT of the base model on them."""

    sample: StageSample = Field(default_factory=lambda: StageSample(k=8, max_keep=1))
    min_tokens: int = Field(0, ge=0, description="keep only traces with at least this many completion tokens")
    reflection: bool = Field(True, description="keep only traces that contain a reflection phrase")
    reflection_words: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFLECTION_WORDS), description="phrases that count as reflection"
    )
    max_traces: int | None = Field(
        None, ge=1, description="fine-tune on at most this many traces (sample.max_keep caps each problem's)"
    )
    sft: StageSFT = Field(default_factory=StageSFT)


class Rejection(Section):
    """Stage 3: verified samples of the stage-2 RL model, then SFT on them."""

    sample: StageSample = Field(default_factory=lambda: StageSample(k=4, max_keep=1))
    start: Literal["base", "rl"] = Field(
        "rl", description="fine-tune the base model (as R1 did) or the stage-2 RL model"
    )
    include_cold_start: bool = Field(
        True, description="add the stage-1 traces to the data (R1 combined its data)"
    )
    sft: StageSFT = Field(default_factory=StageSFT)

    @model_validator(mode="after")
    def _the_teacher_is_the_rl_model(self):
        if self.sample.teacher is not None:
            raise ValueError("sample.teacher is set by the pipeline (the stage-2 RL model); leave it out")
        return self


class PipelineConfig(Section):
    """`r1lab pipeline RECIPE`: the four-stage R1 recipe, one report."""

    out: str = Field(
        "runs/r1-pipeline", description="the pipeline's directory; each stage gets a folder in it"
    )
    seed: int = Field(0, description="seeds the base model's pretraining and the held-out evaluations")
    base: str | None = Field(
        None, description="start from this checkpoint directory (None: pretrain one as `pretrain` says)"
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="used when base is None")
    cold_start: ColdStart = Field(default_factory=ColdStart)
    rl1: StageGRPO = Field(
        default_factory=StageGRPO, description="stage 2; its task and reward define the eval"
    )
    rejection: Rejection = Field(default_factory=Rejection)
    rl2: StageGRPO = Field(default_factory=StageGRPO)
    eval: HeldOut = Field(default_factory=HeldOut, description="held-out evaluation after every stage")
    threads: int | None = Field(
        None, ge=1, description="torch threads of every stage (None: each stage's own)"
    )
    progress: bool | None = Field(None, description="progress output of every stage (None: each stage's own)")
    report: bool = Field(True, description="write OUT/report.html at the end")


# --------------------------------------------------------------------------- helpers


def common(cfg: PipelineConfig) -> dict:
    """The pipeline-wide settings every stage takes where they are set: threads and progress."""
    return {k: getattr(cfg, k) for k in ("threads", "progress") if getattr(cfg, k) is not None}


def with_common(section, cfg: PipelineConfig):
    """A copy of a stage section with the pipeline's threads/progress applied."""
    return section.model_copy(update=common(cfg))


def fingerprint(section, start: str) -> str:
    """What a stage's result depends on: its settings and its start model (not threads or progress)."""
    settings = section.model_dump(mode="json", exclude={"threads", "progress"})
    return json.dumps({"settings": settings, "start": start}, sort_keys=True)


def evaluate_checkpoint(checkpoint: Path, cfg: PipelineConfig, tag: str) -> dict:
    """Held-out numbers of a checkpoint, with the RL stages' engine, task (test split) and grader.

    pass@1 averaged over k, maj@k, pass@k, format rate, mean length and reflection rate, seconds and
    FLOPs (2N per generated token); the samples go to OUT/eval_<tag>.json and OUT/samples_<tag>.jsonl.
    """
    from r1lab.eval.commands import build_sampler
    from r1lab.eval.config import ModelSource
    from r1lab.eval.run import evaluate, write_eval
    from r1lab.metrics import emergence_stats
    from r1lab.modeling import matmul_params
    from r1lab.rollout.base import SamplingParams
    from r1lab.tasks import load_task

    rl, e = cfg.rl1, cfg.eval
    source = ModelSource(path=str(checkpoint), engine=rl.engine, dtype=rl.engine_dtype)
    sampler = build_sampler(source, cfg.seed, cfg.threads)
    spec = rl.eval_task or rl.task.model_copy(update={"split": "test", "limit": e.problems})
    params = SamplingParams(temperature=e.temperature, max_tokens=e.max_tokens, seed=cfg.seed + 999)
    try:
        result = evaluate(
            sampler, load_task(spec)[: e.problems], e.k, params, rl.reward, progress=cfg.progress is not False
        )
    finally:
        getattr(sampler, "close", lambda: None)()
    write_eval(result, cfg.out, tag=tag)
    s, model = result.summary, getattr(sampler, "model", None)
    texts, lengths = [x.text for x in result.samples], [x.n_tokens or 0 for x in result.samples]
    return {
        **{key: s.get(key) for key in ("pass@1", f"maj@{e.k}", f"pass@{e.k}", "format_rate")},
        **emergence_stats(texts, lengths, rl.reflection_words),
        "seconds": s["wall_time_s"],
        "flops": 2.0 * matmul_params(model) * s["generated_tokens"] if model is not None else None,
    }


def pretrain_base(cfg: PipelineConfig) -> tuple[Path, bool]:
    """Pretrain OUT/base as `pretrain` says, or reuse it when built with the same settings.

    Returns the model directory and whether it was (re)built.
    """
    from r1lab.pretrain import pretrain

    out = Path(cfg.out) / "base"
    pre = with_common(cfg.pretrain, cfg).model_copy(update={"out": str(out), "seed": cfg.seed})
    settings = json.dumps(pre.model_dump(mode="json", exclude={"threads", "progress"}), sort_keys=True)
    stamp = out / "settings.json"
    if (out / "model").is_dir() and stamp.is_file() and stamp.read_text(encoding="utf-8") == settings:
        print(f"pipeline: reusing the base model in {out / 'model'} (same settings)")
        return out / "model", False
    model = pretrain(pre)
    stamp.write_text(settings, encoding="utf-8")
    return model, True


class CountingSampler:
    """A `Sampler` that counts the tokens it processed, for the sampling FLOPs (2N per token)."""

    def __init__(self, inner):
        self.inner, self.prompt_tokens, self.completion_tokens = inner, 0, 0

    def generate(self, prompts, n, params):
        out = self.inner.generate(prompts, n, params)
        self.completion_tokens += sum(len(c.token_ids) for c in out)
        self.prompt_tokens += sum(len(c.prompt_token_ids) for c in out[::n])  # prefilled once per prompt
        return out

    stats = property(lambda self: getattr(self.inner, "stats", None))  # HTTP counters, when there are any

    def flops(self) -> float | None:
        """2N per processed token for a local teacher; None for an endpoint (its size is unknown here)."""
        model = getattr(self.inner, "model", None)
        if model is None:
            return None
        from r1lab.modeling import matmul_params

        return 2.0 * matmul_params(model) * (self.prompt_tokens + self.completion_tokens)

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()


def sample_stage(section: SampleConfig, teacher: TeacherSpec, output: Path, overrides: dict) -> dict:
    """Rejection sampling with `teacher` into `output`; returns sample_traces' summary plus FLOPs.

    `overrides` replaces fields of `section` (e.g. the pipeline's threads and progress).
    """
    from r1lab.sft.sample import build_teacher, sample_traces
    from r1lab.tasks import load_task

    data = {**section.model_dump(), **overrides, "teacher": teacher, "output": str(output)}
    sample_cfg = SampleConfig.model_validate(data)
    sampler = CountingSampler(build_teacher(sample_cfg))
    try:
        echo = print if sample_cfg.progress else lambda _line: None
        summary = sample_traces(sample_cfg, sampler, load_task(sample_cfg.task), echo=echo)
    finally:
        sampler.close()
    return {**summary, "completion_tokens": sampler.completion_tokens, "flops": sampler.flops()}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_long_trace(row: dict, min_tokens: int, words: list[str] | None) -> bool:
    """A cold-start trace: at least `min_tokens` long and, when `words` is given, with a reflection phrase.

    >>> row = {"messages": [{"role": "assistant", "content": "<think>7+1=8 wait, check</think>8"}],
    ...        "meta": {"tokens": 30}}
    >>> is_long_trace(row, 20, ["wait"]), is_long_trace(row, 40, None), is_long_trace(row, 0, ["hmm"])
    (True, False, False)
    """
    from r1lab.metrics.emergence import reflection_counts

    if (row.get("meta", {}).get("tokens") or 0) < min_tokens:
        return False
    return not words or reflection_counts([row["messages"][-1]["content"]], words)[0] > 0


def cap_per_problem(rows: list[dict], max_keep: int | None) -> list[dict]:
    """The first `max_keep` rows of each problem (all when None), in their order.

    >>> rows = [{"meta": {"problem_id": p}} for p in "aab"]
    >>> [r["meta"]["problem_id"] for r in cap_per_problem(rows, 1)]
    ['a', 'b']
    """
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        pid = r["meta"]["problem_id"]
        seen[pid] = seen.get(pid, 0) + 1
        if max_keep is None or seen[pid] <= max_keep:
            out.append(r)
    return out


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train_sft(section: StageSFT, start: str, data: list[Path], run_dir: Path) -> tuple[Path, float]:
    """Fine-tune `start` on `data` in `run_dir`; returns the exported model and the training FLOPs."""
    from r1lab.metrics import RunDir
    from r1lab.sft.train import train

    cfg = section.model_copy(update={"model": start, "data": [str(p) for p in data], "run_dir": str(run_dir)})
    last = train(cfg)
    if not last.get("model"):
        raise PipelineError(f"{run_dir}: SFT stopped before its last step (max_seconds?); nothing to hand on")
    return Path(last["model"]), sum(r.get("flops", 0.0) for r in RunDir(run_dir).read_metrics())


def train_rl(section: StageGRPO, start: str, run_dir: Path) -> tuple[Path, float, int]:
    """GRPO from `start` in `run_dir`; returns the final checkpoint, training FLOPs and steps taken."""
    from r1lab.metrics import RunDir
    from r1lab.rl.grpo import train

    last = train(section.model_copy(update={"model": start, "run_dir": str(run_dir)}))
    flops = sum(r.get("flops", 0.0) for r in RunDir(run_dir).read_metrics())
    return Path(last["final_checkpoint"]), flops, int(last.get("step", 0))


# --------------------------------------------------------------------------- the stages


def cold_start(cfg: PipelineConfig, base: Path, stage_dir: Path) -> dict:
    """Stage 1: sample the teacher, keep verified long traces, fine-tune the base on them."""
    cs = cfg.cold_start
    teacher = cs.sample.teacher or TeacherSpec(kind="local", path=str(base))
    # every distinct verified trace is kept first and max_keep applies to the long ones: a cap before
    # the filter would keep a problem's first verified trace, usually a short direct answer
    overrides = {**common(cfg), "max_keep": None}
    sampled = sample_stage(cs.sample, teacher, stage_dir / "traces" / "sampled.jsonl", overrides)
    words = cs.reflection_words if cs.reflection else None
    long_rows = [r for r in read_rows(Path(sampled["output"])) if is_long_trace(r, cs.min_tokens, words)]
    long_rows = cap_per_problem(long_rows, cs.sample.max_keep)[: cs.max_traces]
    if not long_rows:
        raise PipelineError(
            f"{cfg.out}: cold start: none of {sampled['kept_total']} verified traces is long enough "
            f"(min_tokens={cs.min_tokens}, reflection={cs.reflection}); raise cold_start.sample.k or "
            "cold_start.sample.task.limit, or relax the filter"
        )
    data = write_rows(long_rows, stage_dir / COLD_START_TRACES)
    model, train_flops = train_sft(with_common(cs.sft, cfg), str(base), [data], stage_dir)
    return {
        "checkpoint": str(model),
        "traces": {**_trace_counts(sampled), "long": len(long_rows), "file": str(data)},
        "flops": {"sampling": sampled["flops"], "training": train_flops},
    }


def rejection(cfg: PipelineConfig, base: Path, rl_model: Path, stage_dir: Path) -> dict:
    """Stage 3: verified samples of the stage-2 model; SFT of the base or the stage-2 model on them."""
    rj = cfg.rejection
    teacher = TeacherSpec(kind="local", path=str(rl_model))
    sampled = sample_stage(rj.sample, teacher, stage_dir / "traces" / "sampled.jsonl", common(cfg))
    if sampled["kept_total"] == 0:
        raise PipelineError(f"{cfg.out}: rejection sampling: the stage-2 model produced no verified trace")
    cold_traces = Path(cfg.out) / STAGE_DIRS["cold_start"] / COLD_START_TRACES
    data = [Path(sampled["output"])] + ([cold_traces] if rj.include_cold_start else [])
    start = base if rj.start == "base" else rl_model
    model, train_flops = train_sft(with_common(rj.sft, cfg), str(start), data, stage_dir)
    return {
        "checkpoint": str(model),
        "sft_start": rj.start,
        "traces": {**_trace_counts(sampled), "files": [str(p) for p in data]},
        "flops": {"sampling": sampled["flops"], "training": train_flops},
    }


def rl_stage(section: StageGRPO, cfg: PipelineConfig, start: Path, stage_dir: Path) -> dict:
    """Stages 2 and 4: GRPO from the previous stage's model."""
    checkpoint, flops, steps = train_rl(with_common(section, cfg), str(start), stage_dir)
    return {"checkpoint": str(checkpoint), "rl_steps": steps, "flops": {"rl": flops}}  # rollouts included


def _trace_counts(sampled: dict) -> dict:
    keys = ("problems", "total", "accepted", "kept_total", "acceptance_rate", "completion_tokens")
    return {k: sampled.get(k) for k in keys}


def run_stage(cfg: PipelineConfig, name: str, base: Path, start: Path) -> dict:
    """Run one stage in a clean folder; returns its record (checkpoint, traces, FLOPs, seconds)."""
    stage_dir = Path(cfg.out) / STAGE_DIRS[name]
    shutil.rmtree(stage_dir, ignore_errors=True)  # an interrupted stage starts over
    stage_dir.mkdir(parents=True)
    print(f"pipeline: stage {name} from {start} -> {stage_dir}")
    t0 = time.monotonic()
    if name == "cold_start":
        rec = cold_start(cfg, base, stage_dir)
    elif name == "rejection":
        rec = rejection(cfg, base, start, stage_dir)
    else:
        rec = rl_stage(getattr(cfg, name), cfg, start, stage_dir)
    return {"name": name, "dir": str(stage_dir), "start": str(start), **rec, "seconds": time.monotonic() - t0}
