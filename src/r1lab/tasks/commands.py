"""`r1lab tasks`: list the registered tasks, or show a few problems of one with their references.

r1lab tasks                                   # name, kind, verifier, splits, options
r1lab tasks show gsm8k --n 3                  # the first 3 test problems
r1lab tasks show arithmetic --split train -o digits=2 -o "ops=[+,-]"
r1lab tasks show jsonl --path my.jsonl -o question=prompt -o verifier=exact
"""

from __future__ import annotations

import argparse

from r1lab.chat import R1_SYSTEM_PROMPT
from r1lab.config import TaskSpec, parse_override
from r1lab.tasks import TASKS, TaskError, load_task
from r1lab.tasks.base import Problem

#: Longer message and meta texts are cut to this many characters (the full text is in the data file).
SHOW_CHARS = 400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", default="list", help="list (default), or show NAME (or just NAME)"
    )
    parser.add_argument("name", nargs="?", help="task to show (see `r1lab tasks`)")
    parser.add_argument(
        "--split", choices=["train", "test"], default="test", help="split to show (default: test)"
    )
    parser.add_argument("--n", type=int, default=3, help="how many problems to show (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of generators and shuffling")
    parser.add_argument("--path", help="data file for file-backed tasks (jsonl/parquet)")
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option (YAML value); repeatable",
    )


def _cut(text: str) -> str:
    return (
        text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + f"... [{len(text) - SHOW_CHARS} more chars]"
    )


def format_task_table() -> str:
    """The task list: one block per task."""
    lines = []
    for info in TASKS.values():
        kind = "generator" if info.builtin else "data"
        lines.append(f"{info.name:<19} {kind:<9} verifier={info.verifier:<9} splits={','.join(info.splits)}")
        lines.append(f"{'':<19} {info.description}")
        opts = ", ".join(f"{k}={v!r}" for k, v in info.options.items())
        lines.append(f"{'':<19} options: {opts}")
    return "\n".join(lines)


def format_problem(p: Problem) -> str:
    """One problem as a few readable lines: id, messages, reference, metadata."""
    lines = [f"== {p.id}"]
    for m in p.messages:
        content = "[R1 system prompt]" if m["content"] == R1_SYSTEM_PROMPT else _cut(m["content"])
        lines.append(f"  {m['role']}: {content}")
    lines.append(f"  reference: {p.reference}")
    meta = ", ".join(
        f"{k}={_cut(str(v))!r}" if isinstance(v, str) else f"{k}={v!r}" for k, v in p.meta.items()
    )
    lines.append(f"  meta: {meta}")
    return "\n".join(lines)


def _options(pairs: list[str]) -> dict:
    out = {}
    for text in pairs:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise TaskError(f"option {text!r}: expected KEY=VALUE with a plain key")
        out[keys[0]] = value
    return out


def run(args: argparse.Namespace) -> int:
    action, name = args.action, args.name
    if action not in ("list", "show") and name is None:  # `r1lab tasks gsm8k` means show gsm8k
        action, name = "show", action
    if action == "list":
        if name is not None:
            raise TaskError(f"did you mean `r1lab tasks show {name}`?")
        print(format_task_table())
        return 0
    if action != "show":
        raise TaskError(f"tasks: unknown action {action!r}; use list or show NAME")
    if name is None:
        raise TaskError(f"tasks show: name a task; known: {', '.join(TASKS)}")
    if args.n < 1:
        raise TaskError(f"tasks show: --n must be at least 1 (got {args.n})")
    options = _options(args.option)
    spec = TaskSpec(
        name=name, split=args.split, limit=args.n, seed=args.seed, path=args.path, options=options
    )
    for p in load_task(spec):
        print(format_problem(p))
    return 0
