"""Helpers shared by the training benchmarks: machine load, peak memory, FLOP roofline, child processes.

Every system a benchmark compares runs in a child process of its own (`run_child`), so its peak
resident memory is its own (the child reports `getrusage(RUSAGE_SELF)`; the parent cross-checks with
`RUSAGE_CHILDREN`) and one system's allocator, thread pools and compiled kernels cannot help or hurt
the next. A child prints progress on stderr and exactly one JSON object as the last line of stdout.

The roofline is the usual dense-transformer count (`r1lab.metrics.cost`): 2N FLOPs per token a forward
pass reads (generated tokens, and each prompt once), 6N per token trained on (forward + backward),
with N = `r1lab.modeling.matmul_params`; achieved FLOP/s are compared with a square-matmul peak
measured on this machine, in this run, for the dtype the system computed in.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: The problems both benchmarks draw: the built-in arithmetic task's train split (4-digit sums).
TASK = {"name": "arithmetic", "split": "train", "limit": 5000, "seed": 1}


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: the noise figure every timing is reported with."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(msg: str) -> None:
    """Progress on stderr (stdout is reserved for the final JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The one machine-readable line a child (or a benchmark) ends with."""
    print(json.dumps(result, default=float), flush=True)


def run_child(script: Path, spec: dict, timeout: float) -> dict:
    """Run `python script --worker SPEC_JSON`; its last stdout line parsed as JSON, plus RSS and wall time.

    A child that fails or times out yields `{"error": ...}` instead of taking the benchmark down with it,
    so one broken configuration (say, a TRL option this version lacks) still leaves the other figures.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=None,  # the child's progress goes straight to our stderr
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=_child_env(),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "wall_s": wall}
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"last line is not JSON: {lines[-1][:200]!r}", "wall_s": wall}
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN is the max over all children so far: it names this child only when it grew.
    out.setdefault("peak_rss_mib", after / 1024 if after > before else None)
    out["wall_s"] = wall
    return out


def run_cli(argv: list[str], timeout: float) -> dict:
    """Run an `r1lab` command (the installed entry point, else `python -m r1lab.cli`); its stdout or an error."""
    exe = Path(sys.executable).with_name("r1lab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "r1lab.cli"]
    try:
        proc = subprocess.run(
            cmd + argv, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT, env=_child_env()
        )
    except subprocess.TimeoutExpired:
        return {"error": f"r1lab {argv[0]} timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"r1lab {argv[0]} exited with status {proc.returncode}", "stdout": proc.stdout}
    return {"stdout": proc.stdout}


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}


def measure_peaks(dtypes: list[str], threads: int, seconds: float) -> dict[str, float]:
    """Square-matmul FLOP/s per dtype (`r1lab.metrics.cost.measure_matmul_peak`) with `threads` threads."""
    import torch

    from r1lab.metrics.cost import measure_matmul_peak

    torch.set_num_threads(threads)
    return {d: measure_matmul_peak(d, seconds) for d in dtypes}


def measure_cpu_peaks(dtypes: list[str], threads: int, seconds: float) -> dict[str, float]:
    """Square-matmul FLOPs per CPU-second (this process, all threads), best of many 1024^3 products
    over the GEMM libraries of `r1lab.metrics.cost.gemm_kernels`.

    The load-robust twin of `measure_peaks`: a neighbour stealing the core stretches wall time but
    not the CPU time of the work, so the fraction of this peak reached per CPU-second is what a step
    would reach on a quiet machine with one thread.
    """
    import torch

    from r1lab.metrics.cost import gemm_kernels

    torch.set_num_threads(threads)
    out = {}
    for dtype in dtypes:
        a = torch.randn(1024, 1024).to(getattr(torch, dtype))
        b = torch.randn(1024, 1024).to(getattr(torch, dtype))
        fns = list(gemm_kernels(a, b).values())
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for fn in fns:
                fn()  # warm-up, and a pause between the libraries
                c0 = time.process_time()
                for _ in range(4):
                    fn()
                best = max(best, 4 * 2 * 1024**3 / max(time.process_time() - c0, 1e-9))
        out[dtype] = best
    return out


def pick_dtypes(requested: str, peaks: dict[str, float]) -> tuple[list[str], str | None]:
    """`auto`: float32, plus bfloat16 where its matmuls are at least 80% as fast (else it cannot win)."""
    if requested != "auto":
        return requested.split(","), None
    if peaks["bfloat16"] >= 0.8 * peaks["float32"]:
        return ["float32", "bfloat16"], None
    why = (
        f"bfloat16 skipped: its matmul peak here is {peaks['bfloat16'] / 1e9:.1f} GFLOP/s against "
        f"{peaks['float32'] / 1e9:.1f} for float32 (no native bf16); force it with --dtypes float32,bfloat16"
    )
    return ["float32"], why


def machine_peaks(args) -> tuple[dict[str, float], dict[str, float], str | None]:
    """Measure the matmul peaks (wall and per CPU-second), narrow `args.dtypes` to the useful ones,
    print all three; returns (peaks, cpu_peaks, why a dtype was skipped or None)."""
    peaks = measure_peaks(["float32", "bfloat16"], args.threads, seconds=3.0)
    cpu_peaks = measure_cpu_peaks(["float32", "bfloat16"], args.threads, seconds=2.0)
    args.dtypes, skipped = pick_dtypes(args.dtypes, peaks)
    print(
        f"load average {loadavg()}; matmul peak "
        + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in peaks.items())
    )
    print("per CPU-second: " + ", ".join(f"{d} {v / 1e9:.1f} GFLOP" for d, v in cpu_peaks.items()))
    if skipped:
        print(skipped)
    return peaks, cpu_peaks, skipped


def problems_in_order(seed: int, n: int, task: dict = TASK):
    """The first n problems r1lab's GRPO loop draws with this seed (TRL is fed exactly these, in order)."""
    from r1lab.config import TaskSpec
    from r1lab.rl.grpo import ProblemStream
    from r1lab.tasks import load_task

    return ProblemStream(load_task(TaskSpec(**task)), seed).take(n)


def prompt_lengths(problems, tokenizer) -> list[int]:
    """Tokens of each problem's chat-template prompt, as the samplers encode it."""
    texts = [
        tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        for p in problems
    ]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def plot_curves(curves: dict[str, list[float]], xlabel: str, ylabel: str, path: Path) -> None:
    """One line per name, saved as a PNG (skipped quietly when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, marker=".")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_flops(n_params: int, gen_tokens: float, prefill_tokens: float, train_tokens: float) -> float:
    """Useful FLOPs of one RL step: 2N per generated and per (unique) prompt token, 6N per trained token.

    >>> step_flops(10, gen_tokens=3, prefill_tokens=1, train_tokens=4)
    320
    """
    return 2 * n_params * (gen_tokens + prefill_tokens) + 6 * n_params * train_tokens


def summarize_steps(wall: list[float], cpu: list[float], warmup: int) -> dict:
    """Mean, median and spread of the per-step wall times after `warmup` steps, and mean CPU seconds."""
    timed = wall[warmup:]
    if not timed:
        return {"s_per_step": None, "timed_steps": 0}
    return {
        "s_per_step": statistics.fmean(timed),
        "median_s": statistics.median(timed),
        "min_s": min(timed),
        "max_s": max(timed),
        "cpu_s_per_step": statistics.fmean(cpu[warmup:]),
        "timed_steps": len(timed),
    }


def digest(r: dict, peak: float, cpu_peak: float, warmup: int) -> dict:
    """An RL child's figures after warm-up: s/step, tokens/s, roofline fraction (by wall and by CPU time).

    `r` holds per-step `step_times`, `step_cpu_times` and `steps` (token counts), `n_params` and `profile`s.
    """
    if "error" in r:
        return {"error": r["error"]}
    out = summarize_steps(r["step_times"], r["step_cpu_times"], warmup)
    timed = r["steps"][warmup : len(r["step_times"])]
    wall, cpu = sum(r["step_times"][warmup:]), sum(r["step_cpu_times"][warmup:])
    gen = sum(s["gen_tokens"] for s in timed)
    n = r["n_params"]
    flops = sum(step_flops(n, s["gen_tokens"], s["prefill_tokens"], s["train_tokens"]) for s in timed)
    out.update(
        completion_tokens_per_step=gen / len(timed),
        completion_tokens_per_s=gen / wall,
        achieved_gflops=flops / wall / 1e9,
        roofline_fraction=flops / wall / peak,
        # FLOPs per CPU-second against the matmul's FLOPs per CPU-second: the load-robust figure.
        cpu_roofline_fraction=flops / cpu / cpu_peak,
        peak_rss_mib=r.get("peak_rss_mib"),
        loadavg_end=r.get("loadavg"),
        n_params=n,
        profile=r.get("profile"),
        profile_cpu=r.get("profile_cpu"),
    )
    return out


class Clock:
    """Marks of wall time and of this process's CPU time (all its threads); steps are between marks.

    On a loaded machine the wall time of a step grows with the load, while its CPU time stays close
    to what it costs on a quiet machine (with one thread; with more, OpenMP threads that spin while
    waiting for a core inflate it): the benchmarks report both.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def durations(self) -> tuple[list[float], list[float]]:
        pairs = list(zip(self.marks, self.marks[1:], strict=False))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


# --------------------------------------------------------------------------- per-step section timers


class StepTimers:
    """Per-step wall and CPU time of named functions, by wrapping them in place (benchmark processes only).

        timers = StepTimers()
        timers.wrap(torch.Tensor, "backward", "backward")
        timers.new_step()                     # at the start of each step
        timers.per_step(warmup=1, count=4)    # {"backward": mean wall seconds per timed step, ...}
        timers.per_step(1, 4, cpu=True)       # the same in CPU seconds (robust to a loaded machine)

    Wrapping monkeypatches the class or module attribute, so every caller is timed whatever path it
    takes. Nested wrapped calls overlap (a forward timed inside a timed loss counts in both): callers
    subtract to get exclusive times. Calls before the first step (model setup) are not counted.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, list[float]]] = []

    def new_step(self) -> None:
        self.steps.append(defaultdict(lambda: [0.0, 0.0]))

    def add(self, name: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        if self.steps:
            slot = self.steps[-1][name]
            slot[0] += seconds
            slot[1] += cpu_seconds

    def wrap(self, owner, attr: str, name: str) -> None:
        """Replace `owner.attr` by a wrapper that adds its wall and CPU time to the current step."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0, time.process_time() - c0)

        setattr(owner, attr, timed)

    def per_step(self, warmup: int, count: int, cpu: bool = False) -> dict[str, float]:
        """Mean seconds per step of each name over `count` steps after `warmup` (absent counts as 0)."""
        timed = self.steps[warmup : warmup + count]
        names = sorted({k for s in timed for k in s})
        i = 1 if cpu else 0
        return (
            {k: statistics.fmean(s[k][i] if k in s else 0.0 for s in timed) for k in names} if timed else {}
        )
