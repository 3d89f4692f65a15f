"""The `r1lab` command: parse the subcommand, hand the rest to that stage's `commands` module.

Each stage owns its command line in a small module (e.g. `r1lab.rl.commands`) with two functions:
`add_arguments(parser)` and `run(args) -> int`. This file only knows their names, so `r1lab --help`
is instant (no torch import) and a stage's command line lives next to the stage. Errors the user
caused (`R1labError`) are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from r1lab.config import R1labError

#: subcommand -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "r1lab.quickstart",
        "build a tiny base, evaluate, run GRPO, evaluate again, print the table",
    ),
    "pretrain": (
        "r1lab.pretrain",
        "train a tiny base model from scratch on a synthetic task corpus",
    ),
    "grpo": ("r1lab.rl.commands", "reinforcement learning with verifiable rewards (GRPO / Dr. GRPO / DAPO)"),
    "sft": ("r1lab.sft.commands", "supervised fine-tuning on chat-format JSONL traces"),
    "sample": (
        "r1lab.sft.sample_commands",
        "sample k traces per problem from a teacher, keep the verified ones",
    ),
    "distill": ("r1lab.sft.distill_commands", "sample verified teacher traces, then SFT a student on them"),
    "pipeline": (
        "r1lab.pipeline.commands",
        "the four-stage R1 recipe: cold-start SFT, RL, rejection-sampling SFT, RL",
    ),
    "eval": (
        "r1lab.eval.commands",
        "pass@1 (avg over k), maj@k and pass@k of a checkpoint or endpoint on a task",
    ),
    "estimate": (
        "r1lab.metrics.estimate_commands",
        "predict FLOPs, wall time and $ of a recipe before running it",
    ),
    "report": (
        "r1lab.report.commands",
        "write one self-contained HTML report (plots, tables, traces) for run directories",
    ),
    "serve": (
        "r1lab.serve.commands",
        "serve a checkpoint behind an OpenAI/DeepSeek-compatible API with a chat page",
    ),
    "audit-verifier": (
        "r1lab.rewards.audit",
        "check a task's verifier on gold answers and adversarial variants",
    ),
    "tasks": ("r1lab.tasks.commands", "list the tasks, or show a few problems of one"),
}


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: r1lab COMMAND [args] (r1lab COMMAND --help for its arguments)", "", "commands:"]
    lines += [f"  {name:<{width}}  {helptext}" for name, (_, helptext) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from r1lab import __version__

        print(f"r1lab {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"r1lab: unknown command {name!r}; run `r1lab --help` for the list", file=sys.stderr)
        return 2
    module_name, helptext = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == module_name or module_name.startswith(e.name + ".")):
            print(f"r1lab {name}: not yet available", file=sys.stderr)
            return 1
        raise
    parser = argparse.ArgumentParser(prog=f"r1lab {name}", description=helptext)
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(argv[1:])  # flags may come anywhere: `RECIPE --full a=1`
    try:
        return int(module.run(args) or 0)
    except R1labError as e:
        print(f"r1lab {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"r1lab {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
