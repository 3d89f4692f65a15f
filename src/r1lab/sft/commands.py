"""`r1lab sft RECIPE [key=value ...] [--resume]`: supervised fine-tuning on chat-format JSONL traces."""

from __future__ import annotations

from r1lab.config import ConfigError, add_recipe_arguments, load_config, recipe_and_overrides


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in run_dir from its latest checkpoint"
    )


def run_sft(cfg, resume: bool = False, where: str = "sft") -> dict:
    """Train, print the last step and where the model went (distill calls this too)."""
    from r1lab.sft.train import train

    if not cfg.data:
        raise ConfigError(f"{where}: field 'data': required (one or more JSONL traces files)")
    last = train(cfg, resume=resume)
    if "loss" in last:
        print(f"sft: step {last['step']}  loss {last['loss']:.4f}  {last['tok_per_s']:.0f} tok/s")
    print(f"model: {last['model'] or '(not finished; continue with --resume)'}")
    return last


def run(args) -> int:
    from r1lab.sft.config import SFTConfig

    recipe, overrides = recipe_and_overrides(args)
    run_sft(load_config(SFTConfig, recipe, overrides), resume=args.resume, where=recipe or "<defaults>")
    return 0
