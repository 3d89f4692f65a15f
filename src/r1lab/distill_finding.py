"""The distillation finding of DeepSeek-R1, on a laptop: for a small model, distilling a stronger RL
model's verified traces beats running RL on the small model itself.

The R1 report (section 4.1) distilled R1 into Qwen-32B and compared it with large-scale RL on the same
Qwen-32B: the distilled model was far better, for far less compute. Here, after the quickstart's RL
(the teacher), a smaller student with its own base (pretrained from scratch on the same corpus with a
smaller preset) is trained two ways, from the same student base, with the same wall-clock budget:

  distilled  the teacher samples k completions of each of `problems` training problems; the verified
             ones are kept (rejection sampling, `r1lab.sft.sample`) and the student is fine-tuned on
             them (`r1lab.sft.train`). Its wall time (sampling + SFT) is the budget;
  RL-only    GRPO on the student with the quickstart's GRPO settings, stopped once it has used the
             same seconds (`GRPOConfig.max_seconds`; it finishes the step in progress, so it may run
             a little over, and both measured times are reported).

Both students, the student base, and (from the quickstart's summary) the base and the RL teacher are
evaluated on the same held-out problems with `r1lab.quickstart.evaluate_model`, so the numbers are
comparable. Everything goes to OUT/distill/ (`distill_finding.json`, eval files, the two student runs).

Called by `r1lab quickstart --full`:

    finding = run_distillation_finding(cfg, out / "distill", Path(last["final_checkpoint"]), summary)
    print_finding(finding)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from r1lab.config import R1labError, Section

#: GRPO steps when the RL-only student is bounded by time alone (it stops at max_seconds long before)
UNBOUNDED_STEPS = 1_000_000


class DistillFindingConfig(Section):
    """`quickstart --full`: the student and the settings of its two arms (`full.*` on the command line)."""

    student_preset: str = Field(
        "gpt2-1m", description="the student's tiny preset (fewer parameters than the teacher)"
    )
    pretrain_steps: int = Field(600, ge=1, description="pretraining steps of the student's own base")
    pretrain_batch_size: int = Field(32, ge=1, description="rows per pretraining step of the student's base")
    problems: int = Field(256, ge=1, description="training problems the teacher writes traces for")
    k: int = Field(4, ge=1, description="teacher samples per problem")
    max_keep: int | None = Field(2, ge=1, description="distinct verified traces kept per problem at most")
    temperature: float = Field(1.0, ge=0, description="teacher sampling temperature")
    sft_epochs: int = Field(2, ge=1, description="passes of the student's SFT over the kept traces")
    sft_batch_size: int = Field(32, ge=1, description="traces per SFT step")
    sft_lr: float = Field(1e-3, gt=0, description="peak learning rate of the student's SFT")
    rl_lr: float | None = Field(
        None, gt=0, description="GRPO learning rate of the RL-only student (None: grpo.rl.lr)"
    )
    rl_steps: int | None = Field(
        None,
        ge=1,
        description="GRPO steps at most for the RL-only student (None: as many as the budget allows)",
    )
    eval_student_base: bool = Field(
        True, description="also evaluate the student base (what each arm started from)"
    )


def build_student(cfg, f: DistillFindingConfig, out: Path) -> tuple[Path, float]:
    """The student's base: pretrained from scratch like the teacher's, smaller; reused when unchanged."""
    from r1lab.quickstart import build_base

    pre = cfg.pretrain.model_copy(
        update={
            "preset": f.student_preset,
            "train": cfg.pretrain.train.model_copy(
                update={"steps": f.pretrain_steps, "batch_size": f.pretrain_batch_size}
            ),
        }
    )
    student_dir, _, _ = build_base(cfg.model_copy(update={"pretrain": pre}), out / "student")
    info = json.loads((student_dir.parent / "pretrain_summary.json").read_text(encoding="utf-8"))
    return student_dir, info.get("seconds", 0.0)


def distill_arm(cfg, f: DistillFindingConfig, out: Path, teacher: Path, student: Path) -> dict:
    """Rejection-sample the teacher, fine-tune the student on the kept traces; returns times and the model."""
    import shutil

    from r1lab.pipeline.stages import sample_stage, train_sft
    from r1lab.quickstart import task_spec
    from r1lab.sft.config import SampleConfig, SFTConfig, TeacherSpec

    traces = out / "traces.jsonl"
    traces.unlink(missing_ok=True)
    traces.with_name("traces.progress.jsonl").unlink(missing_ok=True)
    sample = SampleConfig(
        teacher=TeacherSpec(kind="local", path=str(teacher)),
        # a seed of its own: not the problems RL trained on first, never held-out ones (train split)
        task=task_spec(cfg).model_copy(
            update={"split": "train", "limit": f.problems, "seed": cfg.grpo.task.seed + 7}
        ),
        sampling=cfg.grpo.sampling.model_copy(update={"temperature": f.temperature}),
        reward=cfg.grpo.reward,
        k=f.k,
        max_keep=f.max_keep,
        problems_per_call=64,
        seed=cfg.seed,
        threads=cfg.grpo.threads,
        progress=False,
    )
    t0 = time.monotonic()
    sampled = sample_stage(sample, sample.teacher, traces, {})
    t_sample = time.monotonic() - t0
    if sampled["kept_total"] == 0:
        raise R1labError(f"{traces}: the RL teacher produced no verified trace; nothing to distill")
    run_dir = out / "student_distilled"
    shutil.rmtree(run_dir, ignore_errors=True)  # derived from the teacher: a rerun trains afresh
    sft = SFTConfig(
        model=str(student),
        run_dir=str(run_dir),
        seed=cfg.seed,
        threads=cfg.grpo.threads,
        epochs=f.sft_epochs,
        batch_size=f.sft_batch_size,
        max_seq_len=cfg.grpo.sampling.max_tokens + 64,  # a prompt is a few characters, completions are capped
        lr=f.sft_lr,
        warmup_steps=5,
        progress=cfg.grpo.progress,
    )
    t1 = time.monotonic()
    model, sft_flops = train_sft(sft, str(student), [traces], run_dir)
    t_sft = time.monotonic() - t1
    return {
        "model": model,
        "seconds": {"sampling": t_sample, "sft": t_sft, "total": t_sample + t_sft},
        "flops": {"sampling": sampled["flops"], "sft": sft_flops},
        "traces": {k: sampled[k] for k in ("total", "accepted", "kept_total", "acceptance_rate")},
    }


def rl_arm(cfg, f: DistillFindingConfig, out: Path, student: Path, budget_s: float) -> dict:
    """GRPO on the student with the quickstart's settings for `budget_s` seconds."""
    import shutil

    from r1lab.pipeline.stages import train_rl
    from r1lab.quickstart import task_spec

    run_dir = out / "student_rl"
    shutil.rmtree(run_dir, ignore_errors=True)
    rl = cfg.grpo.rl.model_copy(
        update={"steps": f.rl_steps or UNBOUNDED_STEPS, "lr": f.rl_lr or cfg.grpo.rl.lr}
    )
    # no held-out evaluation inside the loop: it would spend the arm's budget on something the other arm
    # does not do; both students are evaluated afterwards the same way
    update = {"task": task_spec(cfg), "rl": rl, "max_seconds": budget_s, "eval_every": 0, "seed": cfg.seed}
    grpo = cfg.grpo.model_copy(update=update)
    t0 = time.monotonic()
    checkpoint, flops, steps = train_rl(grpo, str(student), run_dir)
    return {"model": checkpoint, "seconds": time.monotonic() - t0, "steps": steps, "flops": flops}


def n_params(model_dir: Path) -> int:
    from r1lab.modeling import load_model

    model, _ = load_model(model_dir)
    return sum(p.numel() for p in model.parameters())


def run_distillation_finding(
    cfg, out_dir: str | Path, teacher_checkpoint: str | Path, base_summary: dict, finding=None
) -> dict:
    """Distilled vs RL-only student at the same wall-clock budget (see the module docstring).

    `cfg` is the quickstart's config (its `full` section, or `finding` when given, holds the settings);
    `base_summary` the quickstart's summary (its `base` and `rl` held-out numbers). Returns the numbers
    and writes them to OUT_DIR/distill_finding.json.
    """
    from r1lab.metrics import RunDir
    from r1lab.quickstart import evaluate_model

    finding = finding or getattr(cfg, "full", None) or DistillFindingConfig()
    t_all = time.monotonic()
    out, teacher = Path(out_dir), Path(teacher_checkpoint)
    if not teacher.is_dir():
        raise R1labError(f"{teacher}: no such teacher checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    student, pretrain_s = build_student(cfg, finding, out)
    distilled = distill_arm(cfg, finding, out, teacher, student)
    rl = rl_arm(cfg, finding, out, student, distilled["seconds"]["total"])
    heldout = {}
    if finding.eval_student_base:
        heldout["student_base"] = evaluate_model(student, cfg, "student_base", out)
    heldout["student_rl"] = evaluate_model(rl["model"], cfg, "student_rl", out)
    heldout["student_distilled"] = evaluate_model(distilled["model"], cfg, "student_distilled", out)
    teacher_eval = base_summary.get("rl") or evaluate_model(teacher, cfg, "teacher", out)
    pass1 = {
        "base": (base_summary.get("base") or {}).get("pass@1"),
        "rl_teacher": teacher_eval["pass@1"],
        **{name: h["pass@1"] for name, h in heldout.items()},
    }
    result = {
        "student": {
            "preset": finding.student_preset,
            "params": n_params(student),
            "checkpoint": str(student),
        },
        "teacher": {"params": n_params(teacher), "checkpoint": str(teacher)},
        "pass@1": pass1,
        "heldout": heldout,
        "budget_s": distilled["seconds"]["total"],
        "seconds": {
            "student_pretrain": pretrain_s,
            "distill_sampling": distilled["seconds"]["sampling"],
            "distill_sft": distilled["seconds"]["sft"],
            "distill": distilled["seconds"]["total"],
            "student_rl": rl["seconds"],
            "eval": sum(h["seconds"] for h in heldout.values()),
            "total": time.monotonic() - t_all,  # the whole comparison: student base, both arms, evaluations
        },
        "flops": {  # the teacher's sampling counts 2N (teacher) per token; training 6N (student)
            "distill_sampling": distilled["flops"]["sampling"],
            "distill_sft": distilled["flops"]["sft"],
            "student_rl": rl["flops"],
        },
        "student_rl_steps": rl["steps"],
        "traces": distilled["traces"],
        "distilled_beats_rl": pass1["student_distilled"] > pass1["student_rl"],
    }
    RunDir(out).write_json("distill_finding.json", result)
    return result


def print_finding(finding: dict) -> None:
    """The finding as a table: pass@1 of base, teacher, both students; seconds of each student arm."""
    from rich.console import Console
    from rich.table import Table

    p, s = finding["pass@1"], finding["seconds"]
    t = Table(title="Distillation vs RL for a small student (same wall-clock budget)")
    t.add_column("model")
    t.add_column("params", justify="right")
    t.add_column("held-out pass@1", justify="right")
    t.add_column("training", justify="right")
    teacher_n, student_n = finding["teacher"]["params"], finding["student"]["params"]
    t.add_row("base (teacher's)", f"{teacher_n / 1e6:.2f}M", _pct(p["base"]), "pretraining")
    t.add_row("RL teacher", f"{teacher_n / 1e6:.2f}M", _pct(p["rl_teacher"]), "GRPO")
    if "student_base" in p:
        t.add_row(
            "student base",
            f"{student_n / 1e6:.2f}M",
            _pct(p["student_base"]),
            f"pretraining {s['student_pretrain']:.0f}s",
        )
    t.add_row(
        "student, RL only",
        f"{student_n / 1e6:.2f}M",
        _pct(p["student_rl"]),
        f"GRPO {s['student_rl']:.0f}s ({finding['student_rl_steps']} steps)",
    )
    t.add_row(
        "student, distilled",
        f"{student_n / 1e6:.2f}M",
        _pct(p["student_distilled"]),
        f"sample {s['distill_sampling']:.0f}s + SFT {s['distill_sft']:.0f}s ({finding['traces']['kept_total']} traces)",
    )
    Console().print(t)
    verdict = "beats" if finding["distilled_beats_rl"] else "does NOT beat"
    print(f"the distilled student {verdict} the RL-only student at the same wall-clock budget")


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "-"
