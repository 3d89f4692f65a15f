"""Config loading (`r1lab.config`) and the GRPO stage's config (`r1lab.rl.config`).

What a user can get wrong in a recipe or an override must come back as one `ConfigError` line that
names the file and the field; what they get right must land in the typed config exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import Field

from r1lab.config import (
    ConfigError,
    R1labError,
    Section,
    TaskSpec,
    add_recipe_arguments,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    recipe_and_overrides,
)
from r1lab.rl.config import GRPOConfig


class Inner(Section):
    lr: float = Field(1e-3, gt=0)
    ks: list[int] = Field(default_factory=lambda: [1])


class Outer(Section):
    name: str = "x"
    steps: int = Field(10, ge=1)
    inner: Inner = Field(default_factory=Inner)
    task: TaskSpec = Field(default_factory=TaskSpec)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(call) -> str:
    """Run `call`, expect a ConfigError, and return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, f"ConfigError must be one line: {message!r}"
    assert isinstance(info.value, R1labError)
    return message


# --------------------------------------------------------------------------- loading what is right


def test_recipe_fields_and_nested_sections_are_loaded(tmp_path):
    path = write(tmp_path, "name: run1\nsteps: 5\ninner: {lr: 0.5, ks: [1, 4]}\n")
    cfg = load_config(Outer, path)
    assert (cfg.name, cfg.steps, cfg.inner.lr, cfg.inner.ks) == ("run1", 5, 0.5, [1, 4])
    assert cfg.task == TaskSpec()  # untouched sections keep their defaults


def test_no_recipe_and_empty_recipe_give_defaults(tmp_path):
    assert load_config(Outer) == Outer()
    assert load_config(Outer, write(tmp_path, "")) == Outer()
    assert load_config(Outer, write(tmp_path, "# only a comment\n", "c.yaml")) == Outer()


def test_stage_key_is_not_a_field(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "stage: grpo\nsteps: 3\n"))
    assert cfg.steps == 3


def test_overrides_win_over_the_recipe_and_apply_in_order(tmp_path):
    path = write(tmp_path, "steps: 5\ninner: {lr: 0.5}\n")
    cfg = load_config(Outer, path, ["inner.lr=0.25", "steps=7", "steps=8"])
    assert (cfg.inner.lr, cfg.steps) == (0.25, 8)


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(Outer, None, ["inner.ks=[1,4]", "task.name=countdown", "task.options.digits=3"])
    assert cfg.inner.ks == [1, 4]
    assert cfg.task.name == "countdown"
    assert cfg.task.options == {"digits": 3}  # intermediate sections are created on the way


def test_float_override_in_exponent_form_reaches_a_float_field():
    # PyYAML reads `3e-4` as a string (YAML 1.1 floats need a dot); the float field must still get 3e-4.
    assert load_config(Outer, None, ["inner.lr=3e-4"]).inner.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("task.options.digits=3", ["task", "options", "digits"], 3),
        ("a=1.0e-4", ["a"], 1e-4),
        ("a=[1,4]", ["a"], [1, 4]),
        ("a=true", ["a"], True),
        ("a=b=c", ["a"], "b=c"),  # only the first '=' splits: paths may contain '='
        ("a=", ["a"], ""),
        (" a.b =x", ["a", "b"], "x"),
    ],
)
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_parse_override_reads_exponent_floats_as_floats():
    assert parse_override("rl.lr=3e-4") == (["rl", "lr"], 3e-4)


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(GRPOConfig, None, ["model=m", "rl.betas=[0.8,0.9]", "task.options.digits=2"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(GRPOConfig, tmp_path / "config.yaml") == cfg


# --------------------------------------------------------------------------- one-line errors


def test_unknown_key_names_file_and_field(tmp_path):
    path = write(tmp_path, "inner: {lr: 0.5, bogus: 1}\n")
    message = config_error(lambda: load_config(Outer, path))
    assert str(path) in message and "'inner.bogus'" in message and "unknown key" in message


def test_wrong_type_names_file_field_and_value(tmp_path):
    path = write(tmp_path, "steps: many\n")
    message = config_error(lambda: load_config(Outer, path))
    assert str(path) in message and "'steps'" in message and "'many'" in message


def test_out_of_range_value_names_the_field(tmp_path):
    message = config_error(lambda: load_config(Outer, write(tmp_path, "inner: {lr: -1}\n")))
    assert "'inner.lr'" in message and "greater than 0" in message


def test_several_errors_report_the_first_and_count_the_rest(tmp_path):
    message = config_error(lambda: load_config(Outer, write(tmp_path, "steps: 0\nbogus: 1\n")))
    assert "(and 1 more)" in message


def test_missing_required_field_is_named():
    message = config_error(lambda: load_config(GRPOConfig))
    assert "<defaults>" in message and "'model'" in message and "required" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(lambda: load_config(Outer, path))
    assert str(path) in message and "no such recipe file" in message


def test_a_directory_is_not_a_recipe(tmp_path):
    assert "no such recipe file" in config_error(lambda: load_config(Outer, tmp_path))


@pytest.mark.parametrize(
    "text, line",
    [
        ("a: 1\nb: [1, 2\nc: 3\n", 3),  # unclosed flow list: the parser trips on line 3
        ("a: 1\nb:\n  c: 2\n d: 3\n", 4),  # bad indentation
        ("a: 1\n\tb: 2\n", 2),  # a tab cannot start a token
    ],
)
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    message = config_error(lambda: read_yaml(path))
    assert message.startswith(str(path)) and f"line {line}" in message and "invalid YAML" in message


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    message = config_error(lambda: load_config(Outer, path))
    assert str(path) in message and "mapping" in message and kind in message


@pytest.mark.parametrize("text", ["steps", "", "inner.lr"])
def test_override_without_equals(text):
    message = config_error(lambda: load_config(Outer, None, [text]))
    assert repr(text) in message and "key=value" in message


@pytest.mark.parametrize("text", ["=3", "inner..lr=1", ".lr=1", "inner.=1"])
def test_override_with_an_empty_key(text):
    assert "empty key" in config_error(lambda: parse_override(text))


def test_override_into_a_non_section_names_the_field(tmp_path):
    path = write(tmp_path, "name: run1\n")
    message = config_error(lambda: load_config(Outer, path, ["name.sub=1"]))
    assert str(path) in message and "'name.sub'" in message and "'name' is not a section" in message
    message = config_error(lambda: load_config(Outer, None, ["inner=3", "inner.lr=1"]))
    assert "<defaults>" in message and "'inner' is not a section" in message


def test_unknown_override_key_names_the_field():
    message = config_error(lambda: load_config(Outer, None, ["inner.bogus=1"]))
    assert "'inner.bogus'" in message and "unknown key" in message


# --------------------------------------------------------------------------- recipe arguments


def recipe_parser(required: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1lab test")
    add_recipe_arguments(parser, required=required)
    return parser


@pytest.mark.parametrize(
    "argv, recipe, overrides",
    [
        ([], None, []),
        (["r.yaml"], "r.yaml", []),
        (["r.yaml", "a=1", "b.c=2"], "r.yaml", ["a=1", "b.c=2"]),
        (["a=1", "b=2"], None, ["a=1", "b=2"]),  # no recipe: the first positional is an override
        (["dir=x/r.yaml"], "dir=x/r.yaml", []),  # a .yaml path may contain '='
        (["odd=name.yml", "a=1"], "odd=name.yml", ["a=1"]),
    ],
)
def test_recipe_and_overrides(argv, recipe, overrides):
    args = recipe_parser().parse_args(argv)
    assert recipe_and_overrides(args) == (recipe, overrides)


def test_required_recipe_is_enforced_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        recipe_parser(required=True).parse_args([])
    assert info.value.code == 2
    assert "recipe" in capsys.readouterr().err


# --------------------------------------------------------------------------- GRPOConfig


def test_grpo_defaults_are_grpo():
    cfg = load_config(GRPOConfig, None, ["model=m"])
    assert cfg.rl.group_size >= 2 and cfg.rl.scale_rewards and cfg.rl.clip_low == cfg.rl.clip_high


@pytest.mark.parametrize("size", [1, 0, -3])
def test_group_size_below_two_is_rejected(size):
    message = config_error(lambda: load_config(GRPOConfig, None, ["model=m", f"rl.group_size={size}"]))
    assert "'rl.group_size'" in message


def test_unknown_loss_aggregation_is_rejected(tmp_path):
    path = write(tmp_path, "model: m\nrl: {loss_agg: seq-sum}\n")
    message = config_error(lambda: load_config(GRPOConfig, path))
    assert str(path) in message and "'rl.loss_agg'" in message and "'seq-sum'" in message


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_every_loss_aggregation_is_accepted(mode):
    assert load_config(GRPOConfig, None, ["model=m", f"rl.loss_agg={mode}"]).rl.loss_agg == mode


def test_grpo_sections_are_validated_on_assignment():
    cfg = load_config(GRPOConfig, None, ["model=m"])
    with pytest.raises(ValueError):
        cfg.rl.group_size = 1
