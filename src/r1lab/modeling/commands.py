"""`r1lab pretrain RECIPE [key=value ...]`: train a tiny base model from scratch."""

from __future__ import annotations

from r1lab.config import add_recipe_arguments, load_config, recipe_and_overrides


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)


def run(args) -> int:
    from r1lab.modeling.pretrain import PretrainConfig, pretrain

    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(PretrainConfig, recipe, overrides)
    path = pretrain(cfg)
    print(f"base model: {path}")
    return 0
