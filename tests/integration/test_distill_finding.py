"""The distillation finding (`r1lab quickstart --full`) on tiny models: a 1.9M-parameter teacher, a
0.9M-parameter student with its own base, both arms trained and evaluated on the quickstart's held-out
problems, the RL-only arm given the distillation arm's wall time, and everything written down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from r1lab.distill_finding import DistillFindingConfig, run_distillation_finding
from r1lab.quickstart import QuickstartConfig, build_base

pytestmark = pytest.mark.slow


def quickstart_config(out: Path) -> QuickstartConfig:
    """The quickstart at test size: one-digit sums, few steps, a small held-out set."""
    return QuickstartConfig.model_validate(
        {
            "out": str(out),
            "digits": 1,
            "pretrain": {
                "preset": "gpt2-2m",
                "threads": 1,
                "progress": False,
                "corpus": {"problems": 3000, "direct": 0.2, "working": 0.5, "check": 0.3, "slip_rate": 0.5},
                "train": {"steps": 200, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20},
            },
            "grpo": {
                "threads": 1,
                "progress": False,
                "task": {"name": "arithmetic", "split": "train", "limit": 2000, "seed": 1},
                "sampling": {"temperature": 1.0, "max_tokens": 48},
                "rl": {"steps": 3, "prompts_per_step": 4, "group_size": 4, "lr": 1e-3},
                "samples_every": 0,
            },
            "eval": {"problems": 8, "k": 2, "max_tokens": 48},
        }
    )


@pytest.fixture(scope="module")
def finding(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    cfg = quickstart_config(out)
    # the teacher: the quickstart's 1.9M base (RL is not needed to test the plumbing; the quickstart
    # passes its GRPO model)
    teacher, _, _ = build_base(cfg, out)
    small = DistillFindingConfig(
        student_preset="gpt2-1m", pretrain_steps=60, problems=24, k=4, sft_epochs=1, sft_batch_size=8
    )
    base_summary = {"base": {"pass@1": 0.25}}  # no "rl" entry: the teacher is evaluated here
    result = run_distillation_finding(cfg, out / "distill", teacher, base_summary, finding=small)
    return out / "distill", result


def test_reports_pass1_of_base_teacher_and_both_students_on_the_same_problems(finding):
    out, result = finding
    p = result["pass@1"]
    assert set(p) == {"base", "rl_teacher", "student_base", "student_rl", "student_distilled"}
    assert p["base"] == 0.25 and all(0.0 <= v <= 1.0 for v in p.values())
    problems = {
        name: [q["problem_id"] for q in json.loads((out / f"eval_{name}.json").read_text())["problems"]]
        for name in ("teacher", "student_base", "student_rl", "student_distilled")
    }
    assert len({tuple(ids) for ids in problems.values()}) == 1, (
        "every model must see the same held-out problems"
    )
    assert result["distilled_beats_rl"] == (p["student_distilled"] > p["student_rl"])


def test_the_student_is_smaller_and_has_its_own_base(finding):
    out, result = finding
    assert result["student"]["params"] < result["teacher"]["params"]
    assert Path(result["student"]["checkpoint"]) == out / "student" / "base" / "model"
    assert json.loads((out / "student" / "base" / "pretrain_summary.json").read_text())["steps"] == 60
    student = yaml.safe_load((out / "student" / "base" / "config.yaml").read_text())
    teacher = yaml.safe_load((out.parent / "base" / "config.yaml").read_text())
    assert student["preset"] == "gpt2-1m" and teacher["preset"] == "gpt2-2m"
    assert (student["task"], student["corpus"]) == (teacher["task"], teacher["corpus"]), "same corpus"


def test_rl_arm_gets_the_distillation_arm_s_wall_time(finding):
    out, result = finding
    s = result["seconds"]
    assert result["budget_s"] == s["distill"] == pytest.approx(s["distill_sampling"] + s["distill_sft"])
    grpo = yaml.safe_load((out / "student_rl" / "config.yaml").read_text())
    assert (
        grpo["max_seconds"] == pytest.approx(s["distill"])
        and grpo["model"] == result["student"]["checkpoint"]
    )
    rows = [json.loads(line) for line in (out / "student_rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == result["student_rl_steps"] >= 1
    # it stops after the first step that ends past the budget, never before
    assert rows[-1]["elapsed"] > s["distill"] - 1.0
    assert len(rows) == 1 or rows[-2]["elapsed"] <= s["distill"]
    assert result["traces"]["kept_total"] >= 1
    assert all(v > 0 for v in result["flops"].values())
    assert json.loads((out / "distill_finding.json").read_text())["pass@1"] == result["pass@1"]
