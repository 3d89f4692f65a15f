"""A fused decode-attention kernel in C, built with the system compiler at first use; optional.

Why: at decode, each row's new query meets only its own cached keys, so attention is B x H_kv tiny
products ([G, D] x [D, T]) that PyTorch runs as two batched matmuls plus a mask, a scale and a
softmax over [B, H_kv, G, T]. Measured on the 2-core AVX2 CPU (2 threads, 31-90 cached
positions, four layers' caches in turn): 1.62 ms per layer for the quickstart's GPT-2 shape (128
rows, 3 heads, no GQA) and 0.73 ms for qwen2-4m's (64 rows, GQA 2), against 0.90 and 0.37 ms for
this kernel; whole rollouts 1.09-1.24x faster (benchmarks/rollout_vs_hf.py, ablation `native`).
It reads each row's keys and values once, only up to the row's own length, with no mask and no
intermediate tensors. Nothing in PyTorch does this on a CPU: `scaled_dot_product_attention` with
the per-row mask was slower than the two matmuls here.

How: `csrc/decode_attention.c` is compiled once per machine (`cc -O3 -march=native -fopenmp`)
into `~/.cache/r1lab/kernels/` (or `$R1LAB_CACHE`), loaded with ctypes (which releases the GIL
during the call), and checked against the PyTorch path on a probe before first use. OpenMP is
PyTorch's own libgomp, already loaded by `import torch`, so the kernel shares its thread pool and
uses `torch.get_num_threads()` threads. Anything missing (no compiler, a build or probe failure,
`R1LAB_NATIVE=0`, a dtype other than fp32) leaves `available()` False with a reason, and the
engine runs the PyTorch path; results agree to float rounding (tests/unit/test_native.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_fn = None  # the loaded C function once built and probed
_tried = False
reason: str | None = None  # why the kernel is unavailable (None while untried or when available)


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


def _build() -> Path:
    """Compile the kernel into the cache (atomically, so concurrent processes are safe); its path."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(FLAGS).encode(), _cpu_tag().encode()]))
    target = cache_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path):
    fn = ctypes.CDLL(str(path)).r1lab_decode_attention
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, ptr, ptr, ptr, ptr, *[i64] * 14, ctypes.c_float, ctypes.c_int]
    fn.restype = None
    return fn


def length_mask(lens: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, T] for the PyTorch path: row b sees its keys 0..lens[b]-1."""
    allowed = torch.arange(t)[None, :] < lens[:, None]  # [B, T]
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)[:, None, None]  # [B, 1, 1, T]


def reference(q, keys, vals, lens, scale: float) -> torch.Tensor:
    """What the kernel replaces, the engine's PyTorch path: q [B, H, G, D], keys/vals [B, H, T, D]."""
    from r1lab.rollout.kernels import decode_attention  # kernels imports this module

    return decode_attention(q, keys, vals, length_mask(lens, keys.shape[2], q.dtype), scale)


def _probe(fn) -> bool:
    """The kernel against `reference` on strided views like the engine's, ragged lengths, GQA."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 5, 2, 40, 16, generator=gen)  # [K/V, S, H, T_max, D]
    q = torch.randn(5, 2, 3, 16, generator=gen)
    lens = torch.tensor([1, 7, 33, 24, 33])
    keys, vals = cache[0, :, :, :33], cache[1, :, :, :33]
    got = _call(fn, q, keys, vals, lens, 0.25)
    return bool(torch.allclose(got, reference(q, keys, vals, lens, 0.25), atol=1e-5, rtol=1e-4))


def _get():
    global _fn, _tried, reason
    if _tried:
        return _fn
    with _lock:
        if not _tried:
            if os.environ.get("R1LAB_NATIVE", "1") == "0":
                reason = "disabled by R1LAB_NATIVE=0"
            else:
                try:
                    fn = _load(_build())
                    if _probe(fn):
                        _fn = fn
                    else:
                        reason = "the built kernel disagreed with PyTorch on the probe"
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                    reason = f"could not build the native kernel: {e}"
            _tried = True
    return _fn


def available() -> bool:
    """Whether the kernel is built, loaded and probed (builds it on the first call)."""
    return _get() is not None


def _call(fn, q, keys, vals, lens, scale: float) -> torch.Tensor:
    b, h, g, d = q.shape
    t = keys.shape[2]
    out = torch.empty(b, h, g, d, dtype=torch.float32)
    fn(
        q.data_ptr(), keys.data_ptr(), vals.data_ptr(), lens.data_ptr(), out.data_ptr(),
        b, h, g, d, t, *q.stride()[:3], *keys.stride()[:3], *vals.stride()[:3],
        scale, torch.get_num_threads(),
    )  # fmt: skip
    return out


def decode_attention(q, keys, vals, lens, scale: float) -> torch.Tensor | None:
    """Fused attention of one query per row, or None where the kernel cannot run these tensors.

    q [B, H, G, D] and keys/vals [B, H, T, D] fp32 CPU with unit stride on D (the engine's cache
    views are); lens [B] int64, 1 <= lens[b] <= T: row b attends to its keys 0..lens[b]-1.
    Returns [B, H, G, D].
    """
    fn = _get()
    if fn is None:
        return None
    tensors = (q, keys, vals)
    if any(x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1 for x in tensors):
        return None
    lens = lens.to(torch.int64).contiguous()
    if lens.numel() != q.shape[0] or int(lens.min()) < 1 or int(lens.max()) > keys.shape[2]:
        raise ValueError("decode_attention: every row needs 1 <= lens[b] <= T")
    return _call(fn, q, keys, vals, lens, scale)
