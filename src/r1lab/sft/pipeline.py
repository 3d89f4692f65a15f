"""The four-stage DeepSeek-R1 recipe as one run: cold-start SFT -> RL -> rejection-sampling SFT -> RL.

DeepSeek-R1 (not R1-Zero) is trained in four stages, each starting from the previous one's model:

  1. cold start: a few thousand long, readable chain-of-thought traces are collected (sampled from a
     teacher, verified, kept only when they show their working) and the base model is fine-tuned on
     them, so RL starts from a model that already reasons in the wanted form;
  2. reasoning RL: GRPO with rule-based rewards from the cold-start model;
  3. rejection sampling: the stage-2 model writes k samples per training problem, the verified ones
     are kept, and a model is fine-tuned on them (R1 fine-tuned the *base* model on these plus other
     data; `rejection.start` chooses the base or the stage-2 model, `rejection.include_cold_start`
     adds the stage-1 traces to the data, as R1 combined its data);
  4. RL again from the stage-3 model.

Here every stage is an existing r1lab stage (`sft.sample.sample_traces`, `sft.train.train`,
`rl.grpo.train`) configured by its own section of `PipelineConfig`; the pipeline fills in what links
them (each stage's `model` is the previous stage's output, each `run_dir` is a folder under `out`).
On a laptop the cold-start teacher is the base model itself sampled many times: its verified samples
that contain a self-check (a reflection phrase) and are at least `min_tokens` long are the "long
traces". `cold_start.sample.teacher` may instead name a stronger local checkpoint or an
OpenAI-compatible endpoint (e.g. DeepSeek's API).

After the base and after each stage the model is evaluated on the same held-out problems
(`r1lab.quickstart.evaluate_model`: pass@1 averaged over k, maj@k, length, reflection rate).
`OUT/pipeline.json` records the stages, their checkpoints, held-out numbers, wall time and FLOPs
(sampling + training; evaluation separately); `OUT/report.html` overlays the stages' curves.

Resumable by stage: a stage is skipped when `pipeline.json` says it finished, its checkpoint still
exists and its settings (and start model) are unchanged; the first stage that is not skipped and
every stage after it run afresh (an interrupted stage starts over). `--restart` reruns everything.

Run it:  r1lab pipeline recipes/r1-pipeline.yaml [rl1.rl.steps=40 ...] [--restart]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from r1lab.config import R1labError, Section, dump_config
from r1lab.metrics.emergence import DEFAULT_REFLECTION_WORDS
from r1lab.pretrain import PretrainConfig
from r1lab.quickstart import HeldOut, QuickstartConfig, QuickstartGRPO
from r1lab.rl.config import GRPOConfig
from r1lab.sft.config import SampleConfig, SFTConfig, TeacherSpec

#: stage name -> its folder under `out` (numbered, so a directory listing reads in order)
STAGE_DIRS = {"cold_start": "1-cold-start", "rl1": "2-rl", "rejection": "3-rejection-sft", "rl2": "4-rl"}


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
    max_traces: int | None = Field(None, ge=1, description="fine-tune on at most this many traces")
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


def eval_view(cfg: PipelineConfig) -> QuickstartConfig:
    """The pipeline seen as a quickstart config, so `evaluate_model` and `build_base` are reused as they are."""
    grpo = QuickstartGRPO.model_validate(cfg.rl1.model_dump(exclude={"model", "run_dir"}))
    pre = with_common(cfg.pretrain, cfg)
    return QuickstartConfig(out=cfg.out, seed=cfg.seed, pretrain=pre, grpo=grpo, eval=cfg.eval)


class CountingSampler:
    """A `Sampler` that counts the tokens it processed, for the sampling FLOPs (2N per token)."""

    def __init__(self, inner):
        self.inner, self.prompt_tokens, self.completion_tokens = inner, 0, 0

    def generate(self, prompts, n, params):
        out = self.inner.generate(prompts, n, params)
        self.completion_tokens += sum(len(c.token_ids) for c in out)
        self.prompt_tokens += sum(len(c.prompt_token_ids) for c in out[::n])  # prefilled once per prompt
        return out

    @property
    def stats(self):
        return getattr(self.inner, "stats", None)

    def flops(self) -> float | None:
        """2N per processed token for a local teacher; None for an endpoint (its size is unknown here)."""
        model = getattr(self.inner, "model", None)
        if model is None:
            return None
        from r1lab.modeling import matmul_params

        return 2.0 * matmul_params(model) * (self.prompt_tokens + self.completion_tokens)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


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
        echo = print if sample_cfg.progress else _quiet
        summary = sample_traces(sample_cfg, sampler, load_task(sample_cfg.task), echo=echo)
    finally:
        sampler.close()
    return {**summary, "completion_tokens": sampler.completion_tokens, "flops": sampler.flops()}


def _quiet(_line: str) -> None:
    """An `echo` that prints nothing."""


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
    sampled = sample_stage(cs.sample, teacher, stage_dir / "traces" / "sampled.jsonl", common(cfg))
    words = cs.reflection_words if cs.reflection else None
    long_rows = [r for r in read_rows(Path(sampled["output"])) if is_long_trace(r, cs.min_tokens, words)]
    long_rows = long_rows[: cs.max_traces] if cs.max_traces else long_rows
    if not long_rows:
        raise PipelineError(
            f"{cfg.out}: cold start: none of {sampled['kept_total']} verified traces is long enough "
            f"(min_tokens={cs.min_tokens}, reflection={cs.reflection}); raise cold_start.sample.k or "
            "cold_start.sample.task.limit, or relax the filter"
        )
    data = write_rows(long_rows, stage_dir / "traces" / "cold_start.jsonl")
    model, train_flops = train_sft(with_common(cs.sft, cfg), str(base), [data], stage_dir)
    return {
        "checkpoint": str(model),
        "traces": {**_trace_counts(sampled), "long": len(long_rows), "file": str(data)},
        "flops": {"sampling": sampled["flops"], "training": train_flops},
    }


def rejection(cfg: PipelineConfig, base: Path, rl_model: Path, cold_traces: str, stage_dir: Path) -> dict:
    """Stage 3: verified samples of the stage-2 model; SFT of the base or the stage-2 model on them."""
    rj = cfg.rejection
    teacher = TeacherSpec(kind="local", path=str(rl_model))
    sampled = sample_stage(rj.sample, teacher, stage_dir / "traces" / "sampled.jsonl", common(cfg))
    if sampled["kept_total"] == 0:
        raise PipelineError(f"{cfg.out}: rejection sampling: the stage-2 model produced no verified trace")
    data = [Path(sampled["output"])] + ([Path(cold_traces)] if rj.include_cold_start else [])
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


# --------------------------------------------------------------------------- the driver


def stage_section(cfg: PipelineConfig, name: str) -> Section:
    return {"cold_start": cfg.cold_start, "rl1": cfg.rl1, "rejection": cfg.rejection, "rl2": cfg.rl2}[name]


def eval_key(cfg: PipelineConfig) -> str:
    """What the held-out numbers depend on besides the model: a change re-evaluates, never retrains."""
    task = cfg.rl1.task.model_dump(mode="json")
    reward = cfg.rl1.reward.model_dump(mode="json")
    return json.dumps([cfg.eval.model_dump(mode="json"), task, reward, cfg.seed], sort_keys=True)


def run_stage(cfg: PipelineConfig, name: str, base: Path, start: Path, done: dict[str, dict]) -> dict:
    """Run one stage in a clean folder; returns its record (checkpoint, traces, FLOPs, seconds)."""
    stage_dir = Path(cfg.out) / STAGE_DIRS[name]
    shutil.rmtree(stage_dir, ignore_errors=True)  # an interrupted stage starts over
    stage_dir.mkdir(parents=True)
    print(f"pipeline: stage {name} from {start} -> {stage_dir}")
    t0 = time.monotonic()
    if name == "cold_start":
        rec = cold_start(cfg, base, stage_dir)
    elif name == "rejection":
        rec = rejection(cfg, base, start, done["cold_start"]["traces"]["file"], stage_dir)
    else:
        rec = rl_stage(stage_section(cfg, name), cfg, start, stage_dir)
    return {"name": name, "dir": str(stage_dir), "start": str(start), **rec, "seconds": time.monotonic() - t0}


def prepare_base(cfg: PipelineConfig, previous: dict) -> tuple[dict, bool]:
    """The base model's record, and whether it changed since the previous run (then every stage reruns)."""
    from r1lab.quickstart import build_base

    if cfg.base:
        if not Path(cfg.base).is_dir():
            raise R1labError(f"field 'base': {cfg.base}: no such checkpoint directory")
        path, seconds, flops, rebuilt = Path(cfg.base), 0.0, None, False
    else:
        path, wall, flops = build_base(eval_view(cfg), Path(cfg.out))
        rebuilt = wall > 0  # build_base reports 0 s when it reused the base
        seconds = json.loads((path.parent / "pretrain_summary.json").read_text()).get("seconds", wall)
    old = previous.get("base", {})
    changed = rebuilt or old.get("checkpoint") != str(path)
    rec = {"name": "base", "checkpoint": str(path), "seconds": seconds, "flops": {"pretrain": flops}}
    return (rec if changed else {**old, **rec}), changed


def evaluated(rec: dict, cfg: PipelineConfig, key: str) -> dict:
    """The record with held-out numbers for the current evaluation settings (evaluated if missing)."""
    from r1lab.quickstart import evaluate_model

    if rec.get("eval_key") == key and "heldout" in rec:
        return rec
    heldout = evaluate_model(Path(rec["checkpoint"]), eval_view(cfg), rec["name"], Path(cfg.out))
    return {**rec, "heldout": heldout, "pass@1": heldout["pass@1"], "eval_key": key}


def totals(base: dict, stages: list[dict]) -> dict:
    recs = [base, *stages]
    flops = {
        r["name"]: sum(v for v in r["flops"].values() if v) + (r.get("heldout", {}).get("flops") or 0)
        for r in recs
    }
    seconds = {r["name"]: r["seconds"] + r.get("heldout", {}).get("seconds", 0.0) for r in recs}
    return {
        "seconds": {**seconds, "total": sum(seconds.values())},
        "flops": {**flops, "total": sum(flops.values())},
    }


def write_state(cfg: PipelineConfig, base: dict, stages: list[dict]) -> dict:
    """`pipeline.json`, and the pipeline's own metrics.jsonl (one row per stage) that the report plots."""
    from r1lab.metrics import RunDir
    from r1lab.metrics.run import atomic_write_text

    run = RunDir(cfg.out)
    state = {
        "task": cfg.rl1.task.name,
        "k": cfg.eval.k,
        "n_heldout": cfg.eval.problems,
        "base": base,
        "stages": stages,
        **totals(base, stages),
    }
    run.write_json("pipeline.json", state)
    rows = []
    for i, r in enumerate([base, *stages]):
        h = r.get("heldout", {})
        row = {
            "step": i,
            "stage": r["name"],
            "eval/pass@1": h.get("pass@1"),
            f"eval/maj@{cfg.eval.k}": h.get(f"maj@{cfg.eval.k}"),
        }
        rows.append({**row, "flops": sum(v for v in r["flops"].values() if v), "step_time": r["seconds"]})
    atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    return state


def run_pipeline(cfg: PipelineConfig, restart: bool = False) -> dict:
    """Run (or finish) the four stages; returns the content of `pipeline.json` (plus `report`)."""
    out = Path(cfg.out)
    if restart:
        for name in ["base", *STAGE_DIRS.values()]:
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "pipeline.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    state_path = out / "pipeline.json"
    previous = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    dump_config(cfg, out / "config.yaml")
    key = eval_key(cfg)
    base, fresh = prepare_base(cfg, previous)
    base = evaluated(base, cfg, key)
    done_before = {s["name"]: s for s in previous.get("stages", [])}
    stages: list[dict] = []
    start = Path(base["checkpoint"])
    for name in STAGE_DIRS:
        fp = fingerprint(stage_section(cfg, name), str(start))
        old = done_before.get(name)
        if not fresh and old and old.get("fingerprint") == fp and Path(old["checkpoint"]).is_dir():
            print(f"pipeline: stage {name} done before ({old['checkpoint']}); skipped")
            rec = old
        else:
            fresh = True  # this stage's output changes, so every later stage must run again
            rec = {
                **run_stage(cfg, name, Path(base["checkpoint"]), start, {s["name"]: s for s in stages}),
                "fingerprint": fp,
            }
        stages.append(evaluated(rec, cfg, key))
        state = write_state(cfg, base, stages)  # after every stage: an interruption keeps the finished ones
        start = Path(rec["checkpoint"])
    if cfg.report:
        from r1lab.report import write_report

        runs = [out, *([out / "base"] if (out / "base" / "metrics.jsonl").exists() else [])]
        runs += [out / d for d in STAGE_DIRS.values()]
        state["report"] = str(write_report(runs, out / "report.html"))
    return state
