"""`r1lab pipeline RECIPE [key=value ...] [--restart]`: the four-stage R1 recipe, resumable by stage.

The stages themselves are in `r1lab.pipeline.stages`; this is the driver: build or reuse the base, run each
stage whose output is missing or stale (skip the ones done with the same settings and start model),
evaluate after each, keep `OUT/pipeline.json` and `OUT/metrics.jsonl` (one row per stage) current after
every stage, write one report over all stages, and print held-out pass@1 after the base and each stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from r1lab.config import R1labError, add_recipe_arguments, dump_config, load_config, recipe_and_overrides
from r1lab.pipeline.stages import (
    STAGE_DIRS,
    PipelineConfig,
    evaluate_checkpoint,
    fingerprint,
    pretrain_base,
    run_stage,
)

__all__ = ["PipelineConfig", "add_arguments", "print_table", "run", "run_pipeline"]


def eval_key(cfg: PipelineConfig) -> str:
    """What the held-out numbers depend on besides the model: a change re-evaluates, never retrains."""
    rl = cfg.rl1.model_dump(
        mode="json", include={"task", "eval_task", "reward", "reflection_words", "engine"}
    )
    return json.dumps([cfg.eval.model_dump(mode="json"), rl, cfg.seed], sort_keys=True)


def prepare_base(cfg: PipelineConfig, previous: dict) -> tuple[dict, bool]:
    """The base model's record, and whether it changed since the previous run (then every stage reruns)."""
    if cfg.base:
        if not (Path(cfg.base) / "config.json").is_file():
            raise R1labError(f"field 'base': {cfg.base}: not a Hugging Face checkpoint directory")
        path, rebuilt, seconds, flops = Path(cfg.base), False, 0.0, None
    else:
        path, rebuilt = pretrain_base(cfg)
        info = json.loads((path.parent / "pretrain_summary.json").read_text(encoding="utf-8"))
        seconds, flops = info.get("seconds", 0.0), info.get("flops")
    old = previous.get("base", {})
    changed = rebuilt or old.get("checkpoint") != str(path)
    rec = {"name": "base", "checkpoint": str(path), "seconds": seconds, "flops": {"pretrain": flops}}
    return (rec if changed else {**old, **rec}), changed


def evaluated(rec: dict, cfg: PipelineConfig, key: str) -> dict:
    """The record with held-out numbers for the current evaluation settings (evaluated if missing)."""
    if rec.get("eval_key") == key and "heldout" in rec:
        return rec
    heldout = evaluate_checkpoint(Path(rec["checkpoint"]), cfg, rec["name"])
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
    maj = f"maj@{cfg.eval.k}"
    rows = [
        {
            "step": i,
            "stage": r["name"],
            "eval/pass@1": r["heldout"]["pass@1"],
            f"eval/{maj}": r["heldout"][maj],
        }
        | {"flops": sum(v for v in r["flops"].values() if v), "step_time": r["seconds"]}
        for i, r in enumerate([base, *stages])
    ]
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
        fp = fingerprint(getattr(cfg, name), str(start))
        old = done_before.get(name)
        if not fresh and old and old.get("fingerprint") == fp and Path(old["checkpoint"]).is_dir():
            print(f"pipeline: stage {name} done before ({old['checkpoint']}); skipped")
            rec = old
        else:
            fresh = True  # this stage's output changes, so every later stage must run again
            rec = {**run_stage(cfg, name, Path(base["checkpoint"]), start), "fingerprint": fp}
        stages.append(evaluated(rec, cfg, key))
        state = write_state(cfg, base, stages)  # after every stage: an interruption keeps the finished ones
        start = Path(rec["checkpoint"])
    if cfg.report:
        from r1lab.report import write_report

        runs = [out, *([out / "base"] if (out / "base" / "metrics.jsonl").exists() else [])]
        runs += [out / d for d in STAGE_DIRS.values()]
        state["report"] = str(write_report(runs, out / "report.html"))
    return state


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--restart", action="store_true", help="run every stage afresh (default: skip stages already done)"
    )


def print_table(state: dict) -> None:
    """Held-out numbers after each stage, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    from r1lab.metrics.cost import fmt_duration, fmt_si

    k = state["k"]
    t = Table(title=f"R1 pipeline: {state['task']}, {state['n_heldout']} held-out problems, k={k}")
    for col in ("after", "pass@1", f"maj@{k}", "length", "reflection", "wall time", "FLOPs"):
        t.add_column(col, justify="left" if col == "after" else "right")
    for rec in [state["base"], *state["stages"]]:
        h = rec["heldout"]
        t.add_row(
            rec["name"],
            f"{h['pass@1']:.1%}",
            f"{h[f'maj@{k}']:.1%}" if h.get(f"maj@{k}") is not None else "-",
            f"{h['response_len_mean']:.1f}",
            f"{h['reflection_rate']:.1%}",
            fmt_duration(state["seconds"][rec["name"]]),
            fmt_si(state["flops"][rec["name"]], "FLOP"),
        )
    t.add_row(
        "total",
        "",
        "",
        "",
        "",
        fmt_duration(state["seconds"]["total"]),
        fmt_si(state["flops"]["total"], "FLOP"),
    )
    Console().print(t)
    if "report" in state:
        print(f"report: {state['report']}")


def run(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(PipelineConfig, recipe, overrides)
    print_table(run_pipeline(cfg, restart=args.restart))
    return 0
