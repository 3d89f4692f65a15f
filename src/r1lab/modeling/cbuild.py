"""Build a C source of this package with the system compiler, once per machine, and load it.

Used by the rollout engine's decode kernels (`rollout/native.py`, `rollout/csrc/decode.c`) and the
training forward's kernels (`modeling/fused.py`, `modeling/csrc/train.c`). The library is compiled
with `cc -O3 -march=native -fno-trapping-math -fopenmp` into `~/.cache/r1lab/kernels/` (or
`$R1LAB_CACHE`), keyed by the source and its headers, the compiler, the flags and the CPU's feature
flags, so a changed source or another CPU builds anew and concurrent processes are safe (the file is
written under a temporary name and renamed). OpenMP is PyTorch's own libgomp, already loaded by
`import torch`, so kernels share its thread pool. Loading is ctypes, which releases the GIL during
calls. Every user probes its kernels against PyTorch before first use; this module only builds.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]

#: Headers shared by the C sources (`#include "r1lab_math.h"`): bf16 conversion, a vectorisable exp.
INCLUDE = Path(__file__).with_name("csrc")


def cache_dir() -> Path:
    root = os.environ.get("R1LAB_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "r1lab" / "kernels"


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(source: Path) -> Path:
    """Compile `source` into the cache unless already there; the shared library's path.

    Raises RuntimeError when there is no compiler or the compiler fails (callers fall back to
    PyTorch)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    parts = [source.read_bytes(), *(h.read_bytes() for h in sorted(INCLUDE.glob("*.h")))]
    key = hashlib.sha256(b"\0".join([*parts, cc.encode(), " ".join(FLAGS).encode(), _cpu_tag().encode()]))
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, f"-I{INCLUDE}", str(source), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL:
    """The library at `path` with each function's argument and result types set."""
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib
