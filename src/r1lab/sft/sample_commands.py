"""`r1lab sample RECIPE [key=value ...] [--overwrite]`: verified teacher traces by rejection sampling.

Re-running the same command continues where an interrupted run stopped (see `r1lab.sft.sample`).
"""

from __future__ import annotations

import json

from r1lab.config import add_recipe_arguments, load_config, recipe_and_overrides


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an existing output first instead of continuing it"
    )


def print_summary(summary: dict) -> None:
    s = summary
    print(
        f"sample: kept {s['kept']} new traces of {s['total']} samples over {s['sampled_problems']} problems "
        f"(accepted {s['accepted']}, acceptance {s['acceptance_rate']:.1%}, duplicates {s['duplicates']}, "
        f"failed {s['failed']}) in {s['seconds']:.1f}s; {s['kept_total']} traces in {s['output']}"
    )
    if s.get("http"):
        print(f"http: {json.dumps(s['http'], sort_keys=True)}")


def run_sample(cfg, overwrite: bool = False) -> dict:
    """Load the problems and the teacher, sample, print and return the summary (distill calls this too)."""
    from pathlib import Path

    from r1lab.sft.sample import build_teacher, progress_path, sample_traces
    from r1lab.tasks import load_task

    if overwrite:
        for p in (Path(cfg.output), progress_path(cfg.output)):
            p.unlink(missing_ok=True)
    problems = load_task(cfg.task)
    sampler = build_teacher(cfg)
    try:
        summary = sample_traces(cfg, sampler, problems)
    finally:
        close = getattr(sampler, "close", None)
        if close is not None:
            close()
    print_summary(summary)
    return summary


def run(args) -> int:
    from r1lab.sft.config import SampleConfig

    recipe, overrides = recipe_and_overrides(args)
    run_sample(load_config(SampleConfig, recipe, overrides), overwrite=args.overwrite)
    return 0
