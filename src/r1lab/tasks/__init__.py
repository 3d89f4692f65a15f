"""Problem sets: the registry of tasks and `load_task`, the one way every stage gets its problems.

    from r1lab.config import TaskSpec
    from r1lab.tasks import load_task
    problems = load_task(TaskSpec(name="gsm8k", split="test", limit=100))

A task is either a built-in generator (`arithmetic`, `countdown`: deterministic in `seed`, train and
test disjoint by construction, see `holdout`) or a loader of a data file (the shipped GSM8K,
MATH-500, AIME 2024 and Countdown test sets, or any JSONL/Parquet file via `jsonl`). Every `Problem`
has `meta["task"]`, `meta["split"]` and `meta["verifier"]` (which rule grades it), and a stable id
such as `gsm8k/test/17`. `TaskSpec.options` are checked per task: an unknown option or a split the
task lacks is a `TaskError` naming it. This package never imports torch.

    r1lab tasks                       # the table below
    r1lab tasks show countdown --n 3  # a few problems with their references
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from r1lab.config import TaskSpec
from r1lab.tasks.arithmetic import ArithmeticOptions, arithmetic_problem, is_test_arithmetic, iter_arithmetic
from r1lab.tasks.base import Problem, TaskError
from r1lab.tasks.countdown import (
    CountdownOptions,
    countdown_problem,
    countdown_prompt,
    is_test_countdown,
    iter_countdown,
    solve_countdown,
)
from r1lab.tasks.options import Options, option_defaults, parse_options
from r1lab.tasks.shipped import (
    VERIFIERS,
    JsonlOptions,
    ShippedOptions,
    iter_aime2024,
    iter_countdown_file,
    iter_gsm8k,
    iter_jsonl,
    iter_math500,
)

__all__ = [
    "TASKS",
    "VERIFIERS",
    "Problem",
    "TaskError",
    "TaskInfo",
    "arithmetic_problem",
    "countdown_problem",
    "countdown_prompt",
    "is_test_arithmetic",
    "is_test_countdown",
    "is_test_problem",
    "iter_task",
    "load_task",
    "solve_countdown",
]


@dataclass(frozen=True)
class TaskInfo:
    """What `r1lab tasks` shows about a task."""

    name: str
    description: str
    verifier: str  # the verifier of its problems ("option" for jsonl: set by the `verifier` option)
    splits: tuple[str, ...]  # splits available without task.path
    builtin: bool  # a generator (True) or a data loader (False)
    options: dict[str, Any] = field(default_factory=dict)  # option -> default
    default_limit: dict[str, int] = field(default_factory=dict)  # split -> size when task.limit is unset


# (split, seed, options, path) -> problems
Loader = Callable[[str, int, Any, str | None], Iterable[Problem]]


@dataclass(frozen=True)
class _Task:
    info: TaskInfo
    options: type[Options]
    load: Loader


def _task(name: str, options: type[Options], load: Loader, **info: Any) -> _Task:
    return _Task(TaskInfo(name=name, options=option_defaults(options), **info), options, load)


def _shipped(load: Callable[[str, Any, str | None], Iterable[Problem]]) -> Loader:
    return lambda split, seed, opts, path: load(split, opts, path)  # file rows need no seed


def _countdown_file(name: str) -> Loader:
    return lambda split, seed, opts, path: iter_countdown_file(name, split, opts, path)


# Generated splits have no natural size: these are the sizes when task.limit is not set.
_GENERATED = {"splits": ("train", "test"), "builtin": True, "default_limit": {"train": 10_000, "test": 500}}
_TEST_FILE = {"splits": ("test",), "builtin": False}

_REGISTRY: dict[str, _Task] = {
    t.info.name: t
    for t in [
        _task(
            "arithmetic", ArithmeticOptions, lambda split, seed, opts, path: iter_arithmetic(split, seed, opts),
            description="integer + - * on n-digit operands, bare expression prompt (tiny models)",
            verifier="exact", **_GENERATED,
        ),
        _task(
            "countdown", CountdownOptions, lambda split, seed, opts, path: iter_countdown(split, seed, opts),
            description="reach a target from 3-4 numbers with + - * /, each once (TinyZero), solvable only",
            verifier="countdown", **_GENERATED,
        ),
        _task(
            "gsm8k", ShippedOptions, _shipped(iter_gsm8k),
            description="GSM8K grade-school word problems (OpenAI, MIT), 1319 test",
            verifier="gsm8k", **_TEST_FILE,
        ),
        _task(
            "math500", ShippedOptions, _shipped(iter_math500),
            description="MATH-500 competition problems (OpenAI PRM800K split, MIT), 500 test",
            verifier="math", **_TEST_FILE,
        ),
        _task(
            "aime2024", ShippedOptions, _shipped(iter_aime2024),
            description="AIME 2024 I+II, 30 problems, integer answers (evaluation only)",
            verifier="math", **_TEST_FILE,
        ),
        _task(
            "countdown-hf", ShippedOptions, _countdown_file("countdown-hf"),
            description="Countdown-Tasks-3to4 rows 10000-11023 (1024), as prompted by the generator",
            verifier="countdown", **_TEST_FILE,
        ),
        _task(
            "countdown-tinyzero", ShippedOptions, _countdown_file("countdown-tinyzero"),
            description="TinyZero's default Countdown test split (1024)",
            verifier="countdown", **_TEST_FILE,
        ),
        _task(
            "jsonl", JsonlOptions, _shipped(iter_jsonl),
            description="any .jsonl/.parquet at task.path, fields mapped by options",
            verifier="option", splits=("train", "test"), builtin=False,
        ),
    ]
}  # fmt: skip

#: name -> TaskInfo, in the order `r1lab tasks` lists them
TASKS: dict[str, TaskInfo] = {name: t.info for name, t in _REGISTRY.items()}


def _resolve(spec: TaskSpec) -> tuple[_Task, Options]:
    task = _REGISTRY.get(spec.name)
    if task is None:
        raise TaskError(f"unknown task '{spec.name}'; known: {', '.join(TASKS)}")
    opts = parse_options(spec.name, task.options, spec.options)
    info = task.info
    if info.builtin and spec.path is not None:
        raise TaskError(f"task '{spec.name}' is generated; it reads no file (task.path={spec.path!r})")
    # A user file may be any split (it only names the ids); shipped data has the splits it has.
    if spec.path is None and spec.split not in info.splits:
        raise TaskError(
            f"task '{spec.name}' has no '{spec.split}' split (it has: {', '.join(info.splits)}); "
            "set task.path to a file in the same format to use your own"
        )
    return task, opts


def iter_task(spec: TaskSpec) -> Iterator[Problem]:
    """Problems of `spec` in order, ignoring `limit`; endless for a generator's train split.

    For streaming consumers (the pretraining corpus). Options and split are checked before the
    first problem is produced, so errors come at the call, not on the first `next()`.
    """
    task, opts = _resolve(spec)
    return iter(task.load(spec.split, spec.seed, opts, spec.path))


def load_task(spec: TaskSpec) -> list[Problem]:
    """The problems `spec` names: at most `spec.limit` (a generator's default size if unset);
    file rows are shuffled with `spec.seed` first when the `shuffle` option is on."""
    task, opts = _resolve(spec)
    problems: Iterable[Problem] = task.load(spec.split, spec.seed, opts, spec.path)
    if getattr(opts, "shuffle", False):
        problems = list(problems)
        random.Random(spec.seed).shuffle(problems)
    limit = spec.limit if spec.limit is not None else task.info.default_limit.get(spec.split)
    out = list(problems if limit is None else islice(problems, limit))
    if not out:
        raise TaskError(
            f"task '{spec.name}' split '{spec.split}': no problems (empty file or options leave none)"
        )
    return out


def is_test_problem(problem: Problem) -> bool:
    """True iff a problem is held out for evaluation: a generated problem in its test bucket (for
    Countdown: numbers in the bucket or in a shipped test file), or any problem of a test split."""
    meta = problem.meta
    task = meta.get("task")
    if task == "arithmetic":
        return is_test_arithmetic(meta["a"], meta["b"], meta["op"])
    if task == "countdown":
        return is_test_countdown(meta["nums"])
    return meta.get("split") == "test"
