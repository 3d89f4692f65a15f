"""The run directory: everything a run writes, and everything a resume reads.

Layout (the contract every stage and the report rely on):

    RUN/config.yaml             the full config the run was started with
    RUN/metrics.jsonl           one JSON object per step ({"step": N, ...})
    RUN/samples/step_N.jsonl    example completions with their rewards
    RUN/checkpoints/step_N/     a Hugging Face model dir plus trainer_state.pt
    RUN/checkpoints/latest      a text file holding the name of the newest complete checkpoint
    RUN/summary.json, RUN/report.html

Checkpoints are written to a temporary sibling directory, fsynced, then renamed into place, and only
then is `latest` replaced (itself via rename): a SIGKILL at any moment leaves either the old or the
new checkpoint as `latest`, never a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _clean(value):
    """JSON-safe values, recursively: NaN/inf become None so every file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class RunDir:
    """A run directory (see the module docstring). Creating one makes the folders."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.samples_dir = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"
        for d in (self.path, self.samples_dir, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.yaml"

    # ------------------------------------------------------------------ logging

    def log(self, record: dict) -> None:
        """Append one step's metrics as a JSON line (flushed, so a killed run keeps its history)."""
        line = json.dumps(_clean(record), allow_nan=False) + "\n"
        with open(self.metrics_path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line torn by a kill: end it, so this record stays whole
                    line = "\n" + line
            f.write(line.encode("utf-8"))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write: dropped, the step is redone on resume
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only rows with step <= last_step (a resumed run re-logs the steps it redoes)."""
        rows = [r for r in self.read_metrics() if r.get("step", -1) <= last_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_samples(self, name: str, rows: Iterable[dict]) -> Path:
        path = self.samples_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path

    def write_json(self, name: str, data: dict) -> Path:
        path = self.path / name
        atomic_write_text(path, json.dumps(_clean(data), indent=2, allow_nan=False, default=str) + "\n")
        return path

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep_last: int = 2) -> Path:
        """Call `write(tmp_dir)` to fill a checkpoint, then publish it atomically as step_N and `latest`."""
        final = self.checkpoints_dir / f"step_{step}"
        tmp = self.checkpoints_dir / f".tmp_step_{step}_{os.getpid()}_{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.checkpoints_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.checkpoints_dir / "latest", final.name + "\n")
        self._prune(keep_last)
        return final

    def latest_checkpoint(self) -> Path | None:
        marker = self.checkpoints_dir / "latest"
        if not marker.exists():
            return None
        path = self.checkpoints_dir / marker.read_text(encoding="utf-8").strip()
        return path if path.is_dir() else None

    def _prune(self, keep_last: int) -> None:
        if keep_last <= 0:
            return
        latest = self.latest_checkpoint()
        steps = sorted(
            (p for p in self.checkpoints_dir.glob("step_*") if p.is_dir()),
            key=lambda p: int(p.name.split("_")[1]),
        )
        for p in steps[:-keep_last]:
            if p != latest:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.checkpoints_dir.glob(".tmp_step_*"):  # leftovers of a killed writer
            shutil.rmtree(p, ignore_errors=True)
