"""`r1lab grpo RECIPE [key=value ...] [--resume]`: reinforcement learning with verifiable rewards."""

from __future__ import annotations

from r1lab.config import add_recipe_arguments, load_config, recipe_and_overrides


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in run_dir from its latest checkpoint"
    )


def run(args) -> int:
    from r1lab.rl.config import GRPOConfig

    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(GRPOConfig, recipe, overrides)
    from r1lab.rl.grpo import train  # torch and transformers: only once the recipe is known to be valid

    last = train(cfg, resume=args.resume)
    keys = ("step", "reward", "accuracy", "response_len_mean", "reflection_rate", "eval/pass@1")
    print(
        "  ".join(
            f"{k}={last[k]:.4g}" if isinstance(last.get(k), float) else f"{k}={last.get(k)}"
            for k in keys
            if k in last
        )
    )
    print(f"checkpoint: {last.get('final_checkpoint')}")
    return 0
