"""Typed configs for every stage, loaded from YAML recipes with `key=value` overrides.

A recipe is a YAML file whose keys are the fields of one stage's config (nested sections are
nested models). On the command line, `a.b=value` overrides a field; the value is parsed as YAML, so
`rl.lr=3e-4`, `task.name=countdown` and `eval.k=[1,4]` all do what they look like.

Every error a user can cause here (missing file, bad YAML, unknown key, wrong type) is raised as a
`ConfigError` whose one-line message names the file, the field and what was expected; the CLI
prints it and exits with status 2. Each field is documented once, beside the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class R1labError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, never a traceback."""


class ConfigError(R1labError):
    """A recipe or override that does not fit the stage's config."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- shared sections


class TaskSpec(Section):
    """Which problems to use. `name` is a registered task (see `r1lab.tasks.TASKS`)."""

    name: str = Field(
        "arithmetic", description="task name: arithmetic, countdown, gsm8k, math500, aime2024, jsonl"
    )
    split: Literal["train", "test"] = Field("train", description="which split to draw problems from")
    limit: int | None = Field(None, ge=1, description="use at most this many problems (None: all)")
    seed: int = Field(0, description="seed of built-in generators and of shuffling")
    path: str | None = Field(None, description="data file for file-backed tasks (jsonl/parquet)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="task-specific options, e.g. digits, ops, field map"
    )


class SamplingSpec(Section):
    """How completions are sampled (rollouts, evaluation, teacher traces)."""

    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_tokens: int = Field(256, ge=1, le=1_000_000, description="completion tokens at most")
    stop: list[str] = Field(default_factory=list, description="extra stop strings")


class RewardSpec(Section):
    """How a completion is scored. The total is the weighted sum of the parts named here."""

    accuracy_weight: float = Field(1.0, description="weight of the task verifier (answer correct)")
    format_weight: float = Field(0.0, description="weight of the <think> format reward")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO soft overlong punishment: buffer length in tokens (0: off)"
    )
    overlong_penalty: float = Field(1.0, ge=0.0, description="penalty reached at max_tokens")


T = TypeVar("T", bound=BaseModel)


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`'rl.lr=3e-4'` -> `(['rl', 'lr'], 0.0003)`; the value is parsed as YAML.

    >>> parse_override("task.options.digits=3")
    (['task', 'options', 'digits'], 3)
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. rl.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string; people mean the number
            value = (
                float(value) if any(c in value.lower() for c in "e.") and value.strip() == value else value
            )
        except ValueError:
            pass
    return key.split("."), value


def _set_nested(data: dict, keys: list[str], value: Any, where: str) -> None:
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: field '{'.'.join(keys)}': '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"field '{loc}': unknown key"
    if kind == "missing":
        return f"field '{loc}': required but missing"
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"field '{loc}': {err.get('msg', 'invalid')}{got_text}"


def validate(cls: type[T], data: dict, where: str) -> T:
    """Build `cls` from `data`, turning pydantic's report into one line naming `where` and the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ConfigError(f"{where}: {_describe(errs[0])}{more}") from None


def read_yaml(path: str | Path) -> dict:
    """Read a recipe file into a dict, with one-line errors for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: expected a mapping of config fields at the top level, got {type(data).__name__}"
        )
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load a stage config from a YAML recipe (optional) plus `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    data.pop("stage", None)  # recipes may say which command they are for; that is not a field
    where = str(path) if path is not None else "<defaults>"
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _set_nested(data, keys, value, f"{where} (override {ov!r})")
    return validate(cls, data, where)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write a config as YAML (the run directory's `config.yaml`)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


def add_recipe_arguments(parser, required: bool = False) -> None:
    """The arguments every recipe-driven command takes: a recipe path and `key=value` overrides."""
    parser.add_argument("recipe", nargs=None if required else "?", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rl.lr=3e-4 task.limit=100")


def recipe_and_overrides(args) -> tuple[str | None, list[str]]:
    """Split argparse's view: a first positional containing '=' is an override, not a recipe."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)
        recipe = None
    return recipe, overrides
