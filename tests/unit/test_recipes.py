"""Every recipe in `recipes/` loads with the typed config of the command it is for.

A recipe names its command with `stage:`. The config class of a stage is found in `STAGE_CONFIGS`,
or else in the stage's own package (`r1lab/<package>/config.py` or its command module) as a class
named after the stage (`sft` -> `SFTConfig`, `eval` -> `EvalConfig`). A recipe without `stage:`, or
whose stage has no config class, fails: a new kind of recipe must come with its config.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from r1lab.cli import COMMANDS
from r1lab.config import ConfigError, load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.y*ml"))

# Stages whose config class does not follow the naming rule below.
STAGE_CONFIGS = {
    "quickstart": ("r1lab.quickstart", "QuickstartConfig"),
    "pretrain": ("r1lab.pretrain", "PretrainConfig"),
    "grpo": ("r1lab.rl.config", "GRPOConfig"),
}


def import_or_none(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name.startswith(e.name):
            return None  # the module itself does not exist (yet)
        raise


def config_class(stage: str) -> type[BaseModel] | None:
    """The config class of a stage, or None if there is none."""
    if stage in STAGE_CONFIGS:
        module, cls = STAGE_CONFIGS[stage]
        return getattr(importlib.import_module(module), cls)
    if stage not in COMMANDS:
        return None
    command_module = COMMANDS[stage][0]
    wanted = stage.replace("-", "").replace("_", "").lower() + "config"
    for name in (command_module.rpartition(".")[0] + ".config", command_module):
        module = import_or_none(name)
        for attr, obj in (vars(module) if module else {}).items():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and attr.lower() == wanted:
                return obj
    return None


def recipe_problems(path: Path) -> list[str]:
    """What is wrong with a recipe: an empty list when it loads with its stage's config."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("stage"), str):
        return [f"{path.name}: no `stage:` key naming the command it is for"]
    stage = data["stage"]
    problems = []
    if stage not in COMMANDS:
        problems.append(f"{path.name}: stage {stage!r} is not an r1lab command")
    cls = config_class(stage)
    if cls is None:
        return problems + [f"{path.name}: no config class for stage {stage!r}; register it in STAGE_CONFIGS"]
    try:
        load_config(cls, path)
    except ConfigError as e:
        problems.append(str(e))
    return problems


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_with_its_stage_config(path):
    assert recipe_problems(path) == []


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_registered_stages_are_commands(stage):
    assert stage in COMMANDS and issubclass(config_class(stage), BaseModel)


@pytest.mark.parametrize(
    "stage, name", [("sft", "SFTConfig"), ("eval", "EvalConfig"), ("sample", "SampleConfig")]
)
def test_stage_configs_are_found_by_name(stage, name):
    assert config_class(stage).__name__ == name


def test_a_recipe_without_stage_is_a_problem(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\n")
    assert recipe_problems(path) == ["r.yaml: no `stage:` key naming the command it is for"]


def test_a_recipe_whose_stage_has_no_config_is_a_problem(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: telepathy\n")
    problems = recipe_problems(path)
    assert any("not an r1lab command" in p for p in problems)
    assert any("no config class" in p for p in problems)


def test_a_recipe_with_a_bad_field_is_a_problem(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: grpo\nmodel: m\nrl: {group_size: 1}\n")
    (problem,) = recipe_problems(path)
    assert "'rl.group_size'" in problem
