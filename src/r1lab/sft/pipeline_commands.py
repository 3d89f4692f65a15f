"""`r1lab pipeline RECIPE [key=value ...] [--restart]`: the four-stage R1 recipe (see `r1lab.sft.pipeline`).

Stages already finished with the same settings are skipped; `--restart` runs every stage afresh.
At the end a table shows held-out pass@1 after the base and after each stage, with wall time and FLOPs.
"""

from __future__ import annotations

from r1lab.config import add_recipe_arguments, load_config, recipe_and_overrides
from r1lab.sft.pipeline import PipelineConfig

__all__ = ["PipelineConfig", "add_arguments", "print_table", "run"]


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
    from r1lab.sft.pipeline import run_pipeline

    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(PipelineConfig, recipe, overrides)
    print_table(run_pipeline(cfg, restart=args.restart))
    return 0
