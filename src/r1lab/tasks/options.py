"""Task options: each task declares its `options` as a small pydantic model; this checks them.

`TaskSpec.options` is a free dict in the recipe (`task.options.digits=3`), so each task validates its
own keys here: an unknown key or a value of the wrong type is a `TaskError` that names the task and
the option, never a pydantic report.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1lab.tasks.base import TaskError


class Options(BaseModel):
    """Base of every task's options: unknown keys are errors, values are immutable once checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FileOptions(Options):
    """Options every file-backed task has."""

    system: bool = Field(True, description="prepend the R1 system prompt (chat.R1_SYSTEM_PROMPT)")
    shuffle: bool = Field(False, description="shuffle the rows with task.seed before task.limit is applied")


OptionsT = TypeVar("OptionsT", bound=Options)


def parse_options(task: str, cls: type[OptionsT], raw: dict[str, Any]) -> OptionsT:
    """Validate `raw` against `cls`; errors become one-line `TaskError`s naming the option.

    >>> class Opt(Options):
    ...     digits: int = 4
    >>> parse_options("arithmetic", Opt, {"digits": 3}).digits
    3
    >>> parse_options("arithmetic", Opt, {"digit": 3})
    Traceback (most recent call last):
    ...
    r1lab.tasks.base.TaskError: task 'arithmetic': unknown option 'digit'; known: digits
    """
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err.get("loc", ())
        name = str(loc[0]) if loc else ""
        if err.get("type") == "extra_forbidden":
            known = ", ".join(cls.model_fields) or "(none)"
            raise TaskError(f"task '{task}': unknown option '{name}'; known: {known}") from None
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if not name:  # a check across several options (model validator)
            raise TaskError(f"task '{task}': options: {msg}") from None
        raise TaskError(f"task '{task}': option '{name}': {msg} (got {err.get('input')!r})") from None


def option_defaults(cls: type[Options]) -> dict[str, Any]:
    """`{option: default}` for listing a task's options (`r1lab tasks`)."""
    return {name: f.get_default(call_default_factory=True) for name, f in cls.model_fields.items()}
