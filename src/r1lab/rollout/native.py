"""The decode step's non-matmul work in C, built with the system compiler at first use; optional.

Why: at decode each row adds one token, so between the matmuls the engine works on tiny tensors
([64, 256] for qwen2-4m), and PyTorch spends more on dispatch and on passes over memory than on
arithmetic (RMSNorm is six kernels; RoPE, the two cache writes and a masked softmax over
[B, H_kv, G, T] are a dozen more). `csrc/decode.c` does that work in four calls per layer:

* `attend`: RoPE of the new queries and keys, the key/value written into the cache, and attention
  of each row over its own cached positions only (no mask; rows never read past their length);
* `prefill_attend`: the same for the prompts of a prefill, packed back to back: every token's key
  and value, and causal attention within each prompt (one call per layer instead of an SDPA call
  per prompt and per layer);
* `add_norm`: the residual add and the next RMSNorm/LayerNorm in one pass;
* `swiglu` / `gelu_tanh`: the MLP's activation (exp by a vectorised polynomial, ~2e-7 relative);
* `sample`: the Gumbel-max draw of `sampling.sample` (rows without top-p), the same counter-based
  noise in one pass over the logits instead of ~20 PyTorch ops on [B, V] int64 and float tensors.

The matmuls stay in oneDNN. In an engine in bfloat16 the matmuls read and write bf16 while the
residual stream, norms, attention and cache stay fp32; these functions then read the matmul's bf16
output and write its bf16 input themselves (`out_dtype`), so bf16 costs no extra conversion passes.
Measured figures: benchmarks/README.md ("Where the time goes") and `rollout_vs_hf.py --sections
ablations` (`native` against the PyTorch path, engine A/B in one process).

How: `modeling/cbuild.py` compiles the source once per machine into the kernel cache and loads it
with ctypes, and every function is checked against the
PyTorch code it replaces (kernels.py) on a probe before first use. OpenMP is PyTorch's own libgomp,
already loaded by `import torch`, so the kernels share its thread pool and use
`torch.get_num_threads()` threads. Anything missing (no compiler, a build or probe failure,
`R1LAB_NATIVE=0`) leaves `available()` False with a `reason`, and the engine runs the PyTorch path
instead; results agree to float rounding (tests/unit/test_native.py).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from r1lab.modeling import cbuild

SOURCE = Path(__file__).with_name("csrc") / "decode.c"

_lock = threading.RLock()  # re-entered by the probe, which calls the kernels it checks
_lib = None  # the loaded library once built and probed
_candidate = None  # the library while its probe runs (seen only by the probing thread)
_tried = False
reason: str | None = None  # why the kernel is unavailable (None while untried or when available)


def _load(path: Path):
    ptr, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "r1lab_attend": (
            [ptr, i64, c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, c_int, *[i64] * 5, f32, c_int],
            c_int,
        ),
        "r1lab_prefill_attend": (
            [ptr, i64, c_int, ptr, ptr, ptr, ptr, ptr, ptr, c_int, *[i64] * 5, f32, c_int],
            c_int,
        ),
        "r1lab_add_norm": ([ptr, ptr, c_int, ptr, ptr, ptr, c_int, i64, i64, f32, c_int, c_int], None),
        "r1lab_swiglu": ([ptr, c_int, ptr, c_int, i64, i64, c_int], None),
        "r1lab_gelu_tanh": ([ptr, c_int, i64, c_int], None),
        "r1lab_sample": ([ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int], c_int),
    }
    return cbuild.load(path, signatures)


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _check(name: str, *tensors: torch.Tensor | None, bf16: tuple[torch.Tensor | None, ...] = ()) -> None:
    """fp32 CPU tensors with unit stride on the last dim; those in `bf16` (what a matmul reads or
    writes) may also be bfloat16."""
    checks = [(x, (torch.float32,)) for x in tensors] + [(x, (torch.float32, torch.bfloat16)) for x in bf16]
    for x, dtypes in checks:
        if x is not None and (x.dtype not in dtypes or x.device.type != "cpu" or x.stride(-1) != 1):
            raise TypeError(
                f"native.{name}: needs fp32 (bf16 on the matmul side) CPU tensors with unit stride on the last dim"
            )


def _out_dtype(name: str, dtype: torch.dtype) -> int:
    """1 for a bf16 output, 0 for fp32."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"native.{name}: out_dtype must be float32 or bfloat16 (got {dtype})")
    return int(dtype == torch.bfloat16)


def attend(
    qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv_heads: int, scale: float, out_dtype=torch.float32
):
    """RoPE, cache write and attention for one new token per row; returns [B, n_heads * D] in `out_dtype`.

    qkv [B, (H + 2 H_kv) * D]: the fused projection (q heads, then k, then v; fp32 or bf16, as the
    matmul wrote it; the cache is fp32 either way); cos/sin [T, D/2] or
    None (no RoPE); pos [B] int64, each row's new position; k_cache/v_cache [S, H_kv, T_max, D], one
    layer's cache (the engine's `cache[i]`), written at `[b, :, pos[b]]`. Row b's query heads
    `hk*G .. hk*G+G-1` attend to positions `0..pos[b]` of key head hk. Same as `kernels._attend`.
    """
    lib = _need()
    _check("attend", k_cache, v_cache, bf16=(qkv,))
    out_bf16 = _out_dtype("attend", out_dtype)
    if qkv.dim() != 2 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("native.attend: qkv must be [B, (H + 2 H_kv) * D], the caches [S, H_kv, T_max, D]")
    b, d, t_max = qkv.shape[0], k_cache.shape[-1], k_cache.shape[2]
    if qkv.shape[1] != (n_heads + 2 * n_kv_heads) * d or k_cache.stride() != v_cache.stride():
        raise ValueError("native.attend: qkv and the caches do not match the head layout")
    if k_cache.shape[1] != n_kv_heads or k_cache.shape[0] < b or n_heads % n_kv_heads or pos.shape != (b,):
        raise ValueError("native.attend: needs caches [S >= B, H_kv, T_max, D] and one position per row")
    t_tab = _rope_tables("attend", cos, sin, d, t_max)  # positions both the cache and the table cover
    pos = pos.to(device="cpu", dtype=torch.int64).contiguous()
    out = torch.empty(b, n_heads * d, dtype=out_dtype)
    rc = lib.r1lab_attend(
        qkv.data_ptr(), qkv.stride(0), int(qkv.dtype == torch.bfloat16), _ptr(cos), _ptr(sin), pos.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:3], out.data_ptr(), out_bf16,
        b, n_heads, n_kv_heads, d, t_tab, scale, torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise MemoryError("native.attend: no memory for the attention scratch buffers")
    if rc != 0:
        raise ValueError(f"native.attend: every position must be in [0, {t_tab}) (the cache and RoPE table)")
    return out


def _rope_tables(name: str, cos, sin, d: int, limit: int) -> int:
    """Check cos/sin [T, D/2] (or both None); the number of positions they cover (`limit` if None)."""
    if cos is None and sin is None:
        return limit
    _check(name, cos, sin)
    tables_ok = cos is not None and sin is not None and cos.shape == sin.shape and cos.dim() == 2
    if not (tables_ok and cos.shape[1] * 2 == d and cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"native.{name}: cos/sin must be contiguous [T, D/2] tables (D even)")
    return min(limit, cos.shape[0])


def prefill_attend(qkv, cos, sin, pos, n_heads: int, n_kv_heads: int, scale: float, out_dtype=torch.float32):
    """RoPE, keys/values and causal attention of prompts packed back to back (the prefill).

    qkv [N, (H + 2 H_kv) * D] as in `attend`; pos [N] int64: each token's position in its prompt
    (0 where a prompt starts). Returns the attention output [N, H * D] in `out_dtype` and the rotated
    keys and the values [N, H_kv, D] (fp32), what the engine caches. Same as `kernels._prefill_attend`.
    """
    lib = _need()
    _check("prefill_attend", bf16=(qkv,))
    out_bf16 = _out_dtype("prefill_attend", out_dtype)
    if qkv.dim() != 2 or n_heads % n_kv_heads or qkv.shape[1] % (n_heads + 2 * n_kv_heads):
        raise ValueError("native.prefill_attend: qkv must be [N, (H + 2 H_kv) * D]")
    n, d = qkv.shape[0], qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    t_tab = _rope_tables("prefill_attend", cos, sin, d, n)
    pos = pos.to(device="cpu", dtype=torch.int64).contiguous()
    if pos.shape != (n,):
        raise ValueError("native.prefill_attend: needs one position per token")
    k = torch.empty(n, n_kv_heads, d, dtype=torch.float32)
    v = torch.empty(n, n_kv_heads, d, dtype=torch.float32)
    out = torch.empty(n, n_heads * d, dtype=out_dtype)
    rc = lib.r1lab_prefill_attend(
        qkv.data_ptr(), qkv.stride(0), int(qkv.dtype == torch.bfloat16), _ptr(cos), _ptr(sin), pos.data_ptr(),
        k.data_ptr(), v.data_ptr(), out.data_ptr(), out_bf16, n, n_heads, n_kv_heads, d, t_tab, scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise MemoryError("native.prefill_attend: no memory for the attention scratch buffers")
    if rc != 0:
        raise ValueError(
            f"native.prefill_attend: every position must be in [0, {t_tab}) and restart at 0 with each prompt"
        )
    return out, k, v


def add_norm(x, delta, w, b, eps: float, out_dtype=torch.float32) -> torch.Tensor:
    """`x += delta` in place (delta may be None), then the norm of x: LayerNorm when `b` is given,
    else RMSNorm (`kernels._norm`'s rule). x [B, d] fp32 and delta [B, d] (fp32 or bf16: a matmul's
    output) contiguous; returns [B, d] in `out_dtype` (bf16 when it feeds a bf16 matmul)."""
    lib = _need()
    _check("add_norm", x, w, b, bf16=(delta,))
    out_bf16 = _out_dtype("add_norm", out_dtype)
    if not x.is_contiguous() or (delta is not None and (delta.shape != x.shape or not delta.is_contiguous())):
        raise ValueError("native.add_norm: x and delta must be contiguous [B, d] of one shape")
    if x.dim() != 2 or w.shape != x.shape[1:] or (b is not None and b.shape != x.shape[1:]):
        raise ValueError("native.add_norm: x must be [B, d] and the norm's weight (and bias) [d]")
    out = torch.empty_like(x, dtype=out_dtype)
    n, d = x.shape
    delta_bf16 = int(delta is not None and delta.dtype == torch.bfloat16)
    lib.r1lab_add_norm(
        x.data_ptr(), _ptr(delta), delta_bf16, w.data_ptr(), _ptr(b), out.data_ptr(), out_bf16, n, d, eps,
        int(b is not None), torch.get_num_threads(),
    )  # fmt: skip
    return out


def swiglu(u, out_dtype=torch.float32) -> torch.Tensor:
    """u [B, 2F] (gate | up, contiguous; fp32 or bf16) -> silu(gate) * up [B, F] in `out_dtype`."""
    lib = _need()
    _check("swiglu", bf16=(u,))
    out_bf16 = _out_dtype("swiglu", out_dtype)
    if u.dim() != 2 or not u.is_contiguous() or u.shape[1] % 2:
        raise ValueError("native.swiglu: needs a contiguous [B, 2F] tensor")
    n, f2 = u.shape
    out = torch.empty(n, f2 // 2, dtype=out_dtype)
    lib.r1lab_swiglu(
        u.data_ptr(),
        int(u.dtype == torch.bfloat16),
        out.data_ptr(),
        out_bf16,
        n,
        f2 // 2,
        torch.get_num_threads(),
    )
    return out


def gelu_tanh_(u) -> torch.Tensor:
    """GELU with the tanh approximation, in place on a contiguous fp32 or bf16 tensor; returns it."""
    lib = _need()
    _check("gelu_tanh_", bf16=(u,))
    if not u.is_contiguous():
        raise ValueError("native.gelu_tanh_: needs a contiguous tensor")
    lib.r1lab_gelu_tanh(u.data_ptr(), int(u.dtype == torch.bfloat16), u.numel(), torch.get_num_threads())
    return u


def sample(logits, temperature, keys, counters) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampling.sample` for rows without top-p: logits [B, V] fp32, temperature [B] fp32, keys and
    counters [B] int64 -> tokens [B] int64 and their raw-policy log-probs [B] fp32."""
    lib = _need()
    _check("sample", logits, temperature)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError("native.sample: needs contiguous logits [B, V] and [B] row settings")
    b, v = logits.shape
    if (
        not logits.is_contiguous()
        or temperature.shape != (b,)
        or keys.shape != (b,)
        or counters.shape != (b,)
    ):
        raise ValueError("native.sample: needs contiguous logits [B, V] and [B] row settings")
    temperature = temperature.contiguous()
    keys = keys.to(device="cpu", dtype=torch.int64).contiguous()
    counters = counters.to(device="cpu", dtype=torch.int64).contiguous()
    tokens, logp = torch.empty(b, dtype=torch.int64), torch.empty(b, dtype=torch.float32)
    rc = lib.r1lab_sample(
        logits.data_ptr(), b, v, temperature.data_ptr(), keys.data_ptr(), counters.data_ptr(),
        tokens.data_ptr(), logp.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("native.sample: no memory for the hash buffer")
    return tokens, logp


def _probe() -> str | None:
    """Each kernel against the PyTorch code it replaces; the first disagreement, or None."""
    from r1lab.rollout import kernels  # kernels imports this module

    gen = torch.Generator().manual_seed(0)
    close = dict(atol=1e-5, rtol=1e-4)

    def close_to(got, want, half: bool) -> bool:
        """fp32 to float rounding; a bf16 output to its rounding (2^-8 relative, one step either way)."""
        if not half:
            return got.dtype == torch.float32 and torch.allclose(got, want, **close)
        return got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=1e-2, rtol=1e-2)

    # head dims 64 and 128 run specialised code in C, others the generic loops: probe all three
    for heads, kv_heads, rope, d in (
        (6, 2, True, 16),
        (3, 3, False, 64),
        (4, 2, True, 64),
        (2, 1, True, 128),
    ):
        t_max, rows = 40, 5
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=gen)
        cache = torch.randn(2, rows + 1, kv_heads, t_max, d, generator=gen)  # [K/V, S, H_kv, T, D]
        pos = torch.tensor([0, 6, 32, 23, 39])
        cos, sin = torch.randn(t_max, d // 2, generator=gen), torch.randn(t_max, d // 2, generator=gen)
        rot = (cos[pos][:, None], sin[pos][:, None]) if rope else None  # as kernels._rotation
        tables = (cos, sin) if rope else (None, None)
        for half in (False, True):  # fp32, then a bf16 projection in and a bf16 output
            qkv_in = qkv.bfloat16() if half else qkv
            ref_cache, got_cache = cache.clone(), cache.clone()
            ref = kernels._attend(qkv_in.float(), rot, pos, ref_cache[0], ref_cache[1], heads, kv_heads, 0.25)
            out_dtype = torch.bfloat16 if half else torch.float32
            got = attend(qkv_in, *tables, pos, got_cache[0], got_cache[1], heads, kv_heads, 0.25, out_dtype)
            if not (close_to(got, ref, half) and torch.allclose(got_cache, ref_cache, **close)):
                return f"attend (rope={rope}, bf16={half})"
        lens = [3, 1, 7]
        pos = torch.cat([torch.arange(t) for t in lens])
        rows = sum(lens)
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=gen)
        rot = (cos[pos][:, None], sin[pos][:, None]) if rope else None
        for half in (False, True):
            qkv_in = qkv.bfloat16() if half else qkv
            ref, k, v = kernels._prefill_attend(qkv_in.float(), rot, lens, heads, kv_heads, 0.25)
            out_dtype = torch.bfloat16 if half else torch.float32
            got, got_k, got_v = prefill_attend(qkv_in, *tables, pos, heads, kv_heads, 0.25, out_dtype)
            if not (close_to(got, ref, half) and torch.allclose(got_k, k, **close) and torch.equal(got_v, v)):
                return f"prefill_attend (rope={rope}, bf16={half})"
    x, delta = torch.randn(3, 24, generator=gen), torch.randn(3, 24, generator=gen)
    w, b = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    for bias, half in ((None, False), (b, False), (None, True), (b, True)):
        d_in = delta.bfloat16() if half else delta
        x_ref = x + d_in.float()
        got = add_norm(x.clone(), d_in, w, bias, 1e-5, torch.bfloat16 if half else torch.float32)
        if not close_to(got, kernels._norm(x_ref, w, bias, 1e-5), half):
            return f"add_norm ({'LayerNorm' if bias is not None else 'RMSNorm'}, bf16={half})"
    u = torch.randn(4, 40, generator=gen) * 6
    for half in (False, True):
        u_in = u.bfloat16() if half else u
        gate, up = u_in.float().chunk(2, dim=-1)
        if not close_to(swiglu(u_in, u_in.dtype), torch.nn.functional.silu(gate) * up, half):
            return f"swiglu (bf16={half})"
        want = torch.nn.functional.gelu(u_in.float(), approximate="tanh")
        if not close_to(gelu_tanh_(u_in.clone()), want, half):
            return f"gelu_tanh (bf16={half})"
    from r1lab.rollout.sampling import RowParams
    from r1lab.rollout.sampling import sample as torch_sample

    logits = torch.randn(6, 70, generator=gen) * 2
    rows = RowParams.build([1.0, 0.0, 0.7, 1.3, 1e-7, 1.0], [1.0] * 6, [5, 6, 7, 8, 9, 2**32 - 1])
    counters = torch.tensor([0, 1, 2, 3, 4, 2**40])
    want_tokens, want_logp = torch_sample(logits, rows, counters, fused=False)
    tokens, logp = sample(logits, rows.temperature, rows.keys, counters)
    if not (torch.equal(tokens, want_tokens) and torch.allclose(logp, want_logp, **close)):
        return "sample"
    return None


def _get():
    global _lib, _candidate, _tried, reason
    if _tried:
        return _lib
    with _lock:
        if _candidate is not None:  # the probe calling a kernel (other threads wait on the lock)
            return _candidate
        if not _tried:
            if os.environ.get("R1LAB_NATIVE", "1") == "0":
                reason = "disabled by R1LAB_NATIVE=0"
            else:
                try:
                    _candidate = _load(cbuild.build(SOURCE))
                    failed = _probe()
                    if failed:
                        reason = f"the built kernels disagreed with PyTorch on the probe: {failed}"
                    else:
                        _lib = _candidate
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                    reason = f"could not build the native kernels: {e}"
                except Exception as e:  # a probe that fails in any other way: fall back, never crash
                    reason = f"the native kernels failed their probe: {type(e).__name__}: {e}"
                finally:
                    _candidate = None
                    _tried = True
                if _lib is None:  # said once per process: the engine still works, only slower
                    warnings.warn(
                        f"r1lab: {reason}; the CPU engine runs its PyTorch path (~1.3x slower decoding)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _tried = True
    return _lib


def _need():
    lib = _get()
    if lib is None:
        raise RuntimeError(f"the native kernels are not available: {reason}")
    return lib


def available() -> bool:
    """Whether the kernels are built, loaded and probed (builds them on the first call)."""
    return _get() is not None
