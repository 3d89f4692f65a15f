"""`r1lab eval RECIPE [key=value ...]`: evaluate a local checkpoint or an endpoint on one or more tasks.

    r1lab eval recipes/eval-tiny.yaml
    r1lab eval recipes/eval-gsm8k-qwen.yaml k=8 limit=50        (at most 50 problems per task)
    r1lab eval recipes/eval-tiny.yaml model=runs/grpo/checkpoints/step_100

Writes `OUT/config.yaml`, and per task `OUT/eval.json` + `OUT/samples.jsonl` (one task) or
`OUT/eval_<task>.json` + `OUT/samples_<task>.jsonl` (several), then prints one table row per task.
"""

from __future__ import annotations

from pathlib import Path

from r1lab.config import R1labError, add_recipe_arguments, dump_config, load_config, recipe_and_overrides
from r1lab.eval.config import EvalConfig, ModelSource
from r1lab.eval.run import EvalResult, evaluate, write_eval
from r1lab.rollout.base import SamplingParams


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)


def build_sampler(model: ModelSource, seed: int, threads: int | None):
    """The sampler for a config's model: a local engine over a checkpoint, or the HTTP sampler."""
    from r1lab.rollout import make_sampler

    if model.base_url is not None:
        return make_sampler(
            "http", base_url=model.base_url, model=model.name, api_key_env=model.api_key_env,
            max_concurrency=model.max_concurrency, timeout_s=model.timeout_s, seed=seed,
        )  # fmt: skip
    path = Path(model.path)
    if not (path / "config.json").is_file():
        raise R1labError(f"model.path {path}: not a Hugging Face checkpoint directory (no config.json)")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return make_sampler(model.engine, path=str(path), dtype=model.dtype, seed=seed)


def unique_tags(names: list[str]) -> list[str | None]:
    """File tags per task: none for a single task; the task name, numbered when repeated, for several.

    >>> unique_tags(["gsm8k"]), unique_tags(["gsm8k", "math500", "gsm8k"])
    ([None], ['gsm8k', 'math500', 'gsm8k_2'])
    """
    if len(names) == 1:
        return [None]
    seen: dict[str, int] = {}
    tags = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        tags.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return tags


def print_table(rows: list[tuple[str, EvalResult]], k: int) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [key for key in rows[0][1].summary if key.startswith(("pass@", "maj@"))]
    table = Table(title=f"r1lab eval (k={k})")
    for col in ["task", "problems", *keys, "len (tok)", "format", "truncated", "wall (s)"]:
        table.add_column(col, justify="left" if col == "task" else "right")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    for name, res in rows:
        s = res.summary
        length = "-" if s["response_len_mean"] is None else f"{s['response_len_mean']:.0f}"
        table.add_row(
            name, str(s["n_problems"]), *(pct(s.get(key)) for key in keys), length,
            pct(s["format_rate"]), pct(s["truncation_rate"]), f"{s['wall_time_s']:.1f}",
        )  # fmt: skip
    Console().print(table)


def run(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(EvalConfig, recipe, overrides)
    from r1lab.tasks import load_task

    specs = [
        t if cfg.limit is None else t.model_copy(update={"limit": min(cfg.limit, t.limit or cfg.limit)})
        for t in cfg.tasks
    ]
    problem_sets = [load_task(spec) for spec in specs]  # load all first: a bad task fails before sampling
    for spec, problems in zip(specs, problem_sets, strict=True):
        if not problems:
            raise R1labError(f"{recipe or '<defaults>'}: task {spec.name!r} ({spec.split}) has no problems")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    sampler = build_sampler(cfg.model, cfg.seed, cfg.threads)
    s = cfg.sampling
    params = SamplingParams(s.temperature, s.top_p, s.max_tokens, tuple(s.stop), seed=cfg.seed)
    rows = []
    tags = unique_tags([spec.name for spec in specs])
    for spec, problems, tag in zip(specs, problem_sets, tags, strict=True):
        result = evaluate(
            sampler, problems, cfg.k, params, cfg.reward, ks=cfg.ks, progress=cfg.progress,
            batch_prompts=cfg.batch_prompts,
        )  # fmt: skip
        result.summary.update(task=spec.name, split=spec.split, model=cfg.model.describe())
        path = write_eval(result, out, tag)
        print(f"{spec.name}: pass@1 {result.summary['pass@1']:.4f} -> {path}")
        rows.append((tag or spec.name, result))
    print_table(rows, cfg.k)
    return 0
