"""`r1lab pipeline`: the four-stage R1 recipe end to end on a 0.9M-parameter model (recipes/r1-pipeline.yaml
shrunk by overrides): every stage's checkpoint exists and loads, each stage starts from the previous
one's model, pipeline.json records four stages with held-out numbers, one report covers all stages,
and a rerun skips what is done (only a stage whose settings changed runs again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from r1lab.config import load_config
from r1lab.pipeline.commands import run_pipeline
from r1lab.pipeline.stages import STAGE_DIRS, PipelineConfig

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "r1-pipeline.yaml"
STAGES = list(STAGE_DIRS)


def tiny_overrides(out: Path) -> list[str]:
    """The recipe at test size: one-digit sums, a 200-step base, a few samples and steps per stage."""
    task = "{name: arithmetic, split: train, limit: %d, seed: %d, options: {digits: 1}}"
    ov = [
        f"out={out}",
        "threads=1",
        "progress=false",
        "pretrain.preset=gpt2-1m",
        "pretrain.task.options.digits=1",
        "pretrain.corpus={problems: 3000, direct: 0.2, working: 0.5, check: 0.3, slip_rate: 0.5}",
        "pretrain.train={steps: 200, batch_size: 32, lr: 0.003, warmup_steps: 20}",
        "cold_start.sample.task=" + task % (24, 5),
        "cold_start.sample.k=8",
        # any verified trace with working (at least 8 tokens): a 200-step base rarely gets a self-check right
        "cold_start.reflection=false",
        "cold_start.min_tokens=8",
        "cold_start.sft={epochs: 2, batch_size: 8, max_seq_len: 128, lr: 0.0003}",
        "rejection.sample.task=" + task % (24, 6),
        "rejection.sample.k=8",
        "rejection.sft={epochs: 1, batch_size: 8, max_seq_len: 128, lr: 0.0003}",
        "eval={problems: 8, k: 2, max_tokens: 48}",
    ]
    for section in ("cold_start.sample", "rejection.sample", "rl1", "rl2"):
        ov.append(f"{section}.sampling.max_tokens=48")
    for i, rl in enumerate(("rl1", "rl2")):
        ov += [
            f"{rl}.task=" + task % (2000, i + 1),
            f"{rl}.rl={{steps: 2, prompts_per_step: 4, group_size: 4, lr: 0.0001}}",
            f"{rl}.eval_every=0",
            f"{rl}.eval_problems=8",
            f"{rl}.samples_every=0",
        ]
    return ov


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    overrides = tiny_overrides(out)
    state = run_pipeline(load_config(PipelineConfig, RECIPE, overrides))
    return out, overrides, state


def test_every_stage_writes_a_checkpoint_that_the_next_stage_starts_from(run):
    out, _, state = run
    assert [s["name"] for s in state["stages"]] == STAGES
    start = state["base"]["checkpoint"]
    assert Path(start) == out / "base" / "model"
    for stage in state["stages"]:
        ckpt = Path(stage["checkpoint"])
        assert ckpt.is_relative_to(out / STAGE_DIRS[stage["name"]])
        assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
        assert stage["start"] == start, f"{stage['name']} must start from the previous stage's model"
        start = stage["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(state["stages"][-1]["checkpoint"])  # plain transformers
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_pipeline_json_records_four_stages_with_heldout_time_and_flops(run):
    out, _, state = run
    saved = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in saved["stages"]] == STAGES
    for rec in [saved["base"], *saved["stages"]]:
        assert 0.0 <= rec["pass@1"] <= 1.0 and rec["heldout"]["pass@1"] == rec["pass@1"]
        assert saved["seconds"][rec["name"]] > 0 and saved["flops"][rec["name"]] > 0
    assert saved["seconds"]["total"] == pytest.approx(sum(saved["seconds"][n] for n in ["base", *STAGES]))
    for name in ("cold_start", "rejection"):  # SFT stages count their teacher's sampling too
        stage = next(s for s in saved["stages"] if s["name"] == name)
        assert stage["flops"]["sampling"] > 0 and stage["flops"]["training"] > 0
    eval_files = sorted(p.name for p in out.glob("eval_*.json"))
    assert eval_files == sorted(f"eval_{n}.json" for n in ["base", *STAGES])


def test_cold_start_keeps_only_verified_traces_with_working(run):
    out, _, state = run
    rows = [json.loads(line) for line in (out / "1-cold-start" / "traces" / "cold_start.jsonl").open()]
    assert rows and len(rows) == state["stages"][0]["traces"]["long"]
    for row in rows:
        assert row["meta"]["parts"]["accuracy"] == 1.0 and row["meta"]["tokens"] >= 8
        assert row["messages"][-1]["role"] == "assistant"
    rejection = state["stages"][2]
    assert rejection["traces"]["files"][1].endswith("cold_start.jsonl")  # include_cold_start


def test_one_report_covers_every_stage(run):
    out, _, state = run
    html = Path(state["report"]).read_text()
    assert Path(state["report"]) == out / "report.html"
    for folder in ["base", *STAGE_DIRS.values()]:
        assert f">{folder}<" in html, folder
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["base", *STAGES]  # the held-out pass@1 after each stage, plotted
    assert yaml.safe_load((out / "config.yaml").read_text())["out"] == str(out)


def test_rerun_skips_done_stages_and_reruns_only_what_changed(run, run_cli):
    out, overrides, state = run
    status, stdout, _ = run_cli(["pipeline", str(RECIPE), *overrides])
    assert status == 0
    assert stdout.count("skipped") == 4 and "pass@1" in stdout
    again = json.loads((out / "pipeline.json").read_text())
    assert [s["checkpoint"] for s in again["stages"]] == [s["checkpoint"] for s in state["stages"]]

    status, stdout, _ = run_cli(["pipeline", str(RECIPE), *overrides, "rl2.rl.steps=3"])
    assert status == 0
    assert stdout.count("skipped") == 3 and "stage rl2 from" in stdout
    changed = json.loads((out / "pipeline.json").read_text())
    assert changed["stages"][:3] == again["stages"][:3]
    assert changed["stages"][3]["rl_steps"] == 3 and changed["stages"][3]["checkpoint"].endswith("step_3")


def test_the_rejection_teacher_is_the_pipeline_s_to_choose(run_cli, tmp_path):
    status, _, err = run_cli(["pipeline", str(RECIPE), f"out={tmp_path}", "rejection.sample.teacher.path=x"])
    assert status == 2
    assert (
        err.count("\n") == 1 and "field 'rejection'" in err and "sample.teacher is set by the pipeline" in err
    )
