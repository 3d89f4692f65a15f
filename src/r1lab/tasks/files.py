"""Reading problem files (JSONL or Parquet, shipped or the user's) with errors that name file, line, field.

Every loader reads rows through `read_rows`, which yields `(where, row)` pairs: `where` is
`"path:LINE"` for JSONL (1-based line number) and `"path:row N"` for Parquet (1-based row), so any
problem with a row is reported as `"<where>: field 'answer': missing"` by `get_field`. Blank JSONL
lines are skipped. Shipped data lives in the package (`r1lab/data/...`) and is found with
`importlib.resources`, so it works from a wheel as well as from a checkout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from r1lab.tasks.base import TaskError

Source = Path | Traversable


def shipped_file(relpath: str) -> Traversable:
    """The packaged data file `r1lab/data/<relpath>`; a `TaskError` if the install lacks it."""
    f = resources.files("r1lab").joinpath("data", *relpath.split("/"))
    if not f.is_file():
        raise TaskError(f"{f}: shipped data file is missing (was r1lab installed with its package data?)")
    return f


def user_file(path: str) -> Path:
    """A data file named by `task.path`; a `TaskError` if it does not exist or has an unknown suffix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"{p}: no such data file")
    if p.suffix not in (".jsonl", ".parquet"):
        raise TaskError(f"{p}: expected a .jsonl or .parquet file")
    return p


def read_rows(source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, row)` for each row of a `.jsonl` or `.parquet` file."""
    if source.name.endswith(".parquet"):
        yield from _parquet_rows(source)
    else:
        yield from _jsonl_rows(source)


def _jsonl_rows(source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    # Binary lines decoded one by one, so a bad byte is reported on its own line number.
    with source.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{source}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TaskError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _parquet_rows(source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq  # lazy: only Parquet users pay for the import

    try:
        with source.open("rb") as fh:
            table = pq.read_table(fh)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise TaskError(f"{source}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{source}:row {i}", row


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


def get_field(row: dict[str, Any], name: str, types: type | tuple[type, ...], where: str) -> Any:
    """`row[name]`, checked to be one of `types` (bools are never numbers here).

    >>> get_field({"answer": 3}, "answer", str, "f.jsonl:7")
    Traceback (most recent call last):
    ...
    r1lab.tasks.base.TaskError: f.jsonl:7: field 'answer': expected a string, got int
    """
    if name not in row or row[name] is None:
        raise TaskError(f"{where}: field '{name}': missing")
    value = row[name]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise TaskError(f"{where}: field '{name}': expected {expected}, got {type(value).__name__}")
    return value


def get_int_list(row: dict[str, Any], name: str, where: str) -> list[int]:
    """A field holding a non-empty list of integers (e.g. Countdown's `nums`)."""
    value = get_field(row, name, list, where)
    if not value or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise TaskError(f"{where}: field '{name}': expected a non-empty list of integers, got {value!r}")
    return list(value)
