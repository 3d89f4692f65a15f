"""Live progress for long stages: a rich bar with the key metrics on a terminal, plain lines in logs,
and TensorBoard scalars when the `tensorboard` package is installed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _fmt(stats: dict, keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        v = stats.get(k)
        if isinstance(v, float):
            parts.append(f"{k.split('/')[-1]} {v:.3g}")
        elif v is not None:
            parts.append(f"{k.split('/')[-1]} {v}")
    return "  ".join(parts)


class StepProgress:
    """`with StepProgress(name, total, start) as p: p.update(step, stats)`.

    On a terminal: a live bar whose text shows `keys` from the latest stats. Elsewhere (CI, pipes):
    one line every `every` steps, so logs stay readable.
    """

    def __init__(
        self,
        name: str,
        total: int,
        start: int = 0,
        keys: tuple[str, ...] = ("reward", "accuracy", "response_len_mean", "reflection_rate"),
        enabled: bool = True,
        every: int = 10,
        tensorboard_dir: Path | None = None,
    ):
        self.name, self.total, self.start, self.keys = name, total, start, keys
        self.enabled, self.every = enabled, every
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._tb = _tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None
        self._t0 = time.monotonic()

    def __enter__(self) -> StepProgress:
        if self.live:
            self._progress = Progress(
                TextColumn(f"[bold]{self.name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, completed=self.start)
        return self

    def update(self, step: int, stats: dict) -> None:
        """Report that `step` (1-based count of finished steps) is done, with its metrics."""
        if self._tb is not None:
            for k, v in stats.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if not self.enabled:
            return
        text = _fmt(stats, self.keys)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, description=text)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.monotonic() - self._t0
            print(
                f"[{self.name}] step {step}/{self.total} {elapsed:6.1f}s  {text}", file=sys.stderr, flush=True
            )

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(log_dir=str(path))
