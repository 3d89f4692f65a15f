"""The training forward's C kernels (`csrc/train.c`) as autograd Functions; optional.

Each Function does one pass over memory forward and one backward where PyTorch's autograd does
many (see train.c): `rms_norm` and `layer_norm` (output fp32 or bf16 for the next matmul), `swiglu`
(silu(gate) * up from the fused gate|up projection), `gelu_tanh` (GPT-2's) and `rope_scatter` (RoPE
of the fused q|k|v projection's q and k heads, each token's row moved to its slot in the attention
layout of packed rows). Arithmetic is fp32; bf16 tensors (a bf16 matmul's input or output) are read and written
directly, rounded to nearest even.

The library is built by `cbuild` at first use and checked against the PyTorch formulas (values and
gradients, fp32 and bf16) on a probe; `available()` is False, with a `reason`, when there is no
compiler, the build or the probe fails, or `R1LAB_NATIVE=0`. Callers then keep Hugging Face's own
forward (`modeling/fused.py`).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from r1lab.modeling import cbuild

SOURCE = Path(__file__).with_name("csrc") / "train.c"

_lock = threading.Lock()
_lib = None
_tried = False
reason: str | None = None  # why the kernels are unavailable (None while untried or when available)


def _load(path: Path):
    ptr, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    act = ([ptr, c_int, ptr, c_int, ptr, c_int, i64, i64, c_int], c_int)
    return cbuild.load(
        path,
        {
            "r1lab_norm_fwd": ([ptr, ptr, ptr, f32, c_int, ptr, c_int, ptr, ptr, i64, i64, c_int], c_int),
            "r1lab_norm_bwd": (
                [ptr, ptr, ptr, ptr, c_int, ptr, c_int, ptr, ptr, ptr, i64, i64, c_int],
                c_int,
            ),
            "r1lab_gelu": act,
            "r1lab_swiglu": act,
            "r1lab_rope_move": ([ptr, c_int, ptr, ptr, ptr, ptr, ptr, c_int, *[i64] * 6, c_int], c_int),
        },
    )


def _ok(rc: int, name: str) -> None:
    if rc == -1:
        raise MemoryError(f"train_kernels.{name}: no memory for a row buffer")
    if rc != 0:
        raise ValueError(f"train_kernels.{name}: a position or slot is out of range")


def _half(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


def _contig(x: torch.Tensor) -> torch.Tensor:
    """What the kernels read: contiguous, and fp32 unless bf16 (an incoming gradient may be either)."""
    x = x.contiguous()
    return x if x.dtype in (torch.float32, torch.bfloat16) else x.float()


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


_FLOATS = (torch.float32, torch.bfloat16)


def _arg(fn: str, what: str, x, dtypes, shape: tuple) -> None:
    """A clear error, before any pointer reaches C, unless x is a contiguous CPU tensor of one of
    `dtypes` and of `shape` (None entries: any size)."""
    ok = (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.dtype in dtypes
        and x.is_contiguous()
        and x.dim() == len(shape)
        and all(want is None or got == want for got, want in zip(x.shape, shape, strict=True))
    )
    if not ok:
        got = f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"train_kernels.{fn}: {what} must be a contiguous CPU tensor of {'/'.join(map(str, dtypes))} "
            f"and shape {tuple('*' if n is None else n for n in shape)}; got {got}"
        )


class _Norm(torch.autograd.Function):
    """RMSNorm (`b` None and not `layer_norm`) or LayerNorm of x [T, d] fp32 -> [T, d] `out_dtype`."""

    @staticmethod
    def forward(ctx, x, w, b, eps: float, layer_norm: bool, out_dtype: torch.dtype):
        T, d = x.shape
        out = torch.empty(T, d, dtype=out_dtype)
        mean, rstd = (torch.empty(T) if layer_norm else None), torch.empty(T)
        rc = _lib.r1lab_norm_fwd(
            x.data_ptr(), w.data_ptr(), _ptr(b), eps, int(layer_norm), out.data_ptr(), _half(out), _ptr(mean),
            rstd.data_ptr(), T, d, torch.get_num_threads(),
        )  # fmt: skip
        _ok(rc, "norm")
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.layer_norm, ctx.bias = layer_norm, b is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        T, d = x.shape
        dy = _contig(dy)
        threads = torch.get_num_threads()
        dx = torch.empty(T, d)
        dw = torch.empty(threads, d)
        db = torch.empty(threads, d) if ctx.bias else None
        rc = _lib.r1lab_norm_bwd(
            x.data_ptr(), w.data_ptr(), _ptr(mean), rstd.data_ptr(), int(ctx.layer_norm), dy.data_ptr(), _half(dy),
            dx.data_ptr(), dw.data_ptr(), _ptr(db), T, d, threads,
        )  # fmt: skip
        _ok(rc, "norm backward")
        return dx, dw.sum(0), (db.sum(0) if db is not None else None), None, None, None


class _Activation(torch.autograd.Function):
    """GELU-tanh (`kind` "gelu": [T, F] -> [T, F]) or SwiGLU ("swiglu": [T, 2F] -> [T, F]); the
    output and the input's gradient in the input's dtype. One C function per kind does both ways."""

    @staticmethod
    def forward(ctx, u, kind: str):
        T, width = u.shape
        F = width if kind == "gelu" else width // 2
        out = torch.empty(T, F, dtype=u.dtype)
        fn = getattr(_lib, f"r1lab_{kind}")
        _ok(
            fn(u.data_ptr(), _half(u), None, 0, out.data_ptr(), _half(out), T, F, torch.get_num_threads()),
            kind,
        )
        ctx.save_for_backward(u)
        ctx.kind, ctx.F = kind, F
        return out

    @staticmethod
    def backward(ctx, dy):
        (u,) = ctx.saved_tensors
        dy = _contig(dy)
        du = torch.empty_like(u)
        fn = getattr(_lib, f"r1lab_{ctx.kind}")
        rc = fn(
            u.data_ptr(), _half(u), dy.data_ptr(), _half(dy), du.data_ptr(), _half(du), u.shape[0], ctx.F,
            torch.get_num_threads(),
        )  # fmt: skip
        _ok(rc, f"{ctx.kind} backward")
        return du, None


def _positions(cos: torch.Tensor | None, pos: torch.Tensor) -> int:
    """The positions a table covers (without tables, any position is valid)."""
    return cos.shape[0] if cos is not None else int(pos.max()) + 1 if len(pos) else 1


class _RopeScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, pos, slot, S: int, H: int, Hkv: int, D: int):  # qkv [T, C] -> [S, C]
        T, C = qkv.shape
        out = qkv.new_zeros(S, C)
        rc = _lib.r1lab_rope_move(
            qkv.data_ptr(), _half(qkv), _ptr(cos), _ptr(sin), pos.data_ptr(), slot.data_ptr(),
            out.data_ptr(), 0, T, S, _positions(cos, pos), H, Hkv, D, torch.get_num_threads(),
        )  # fmt: skip
        _ok(rc, "rope_scatter")
        ctx.save_for_backward(cos, sin, pos, slot)
        ctx.dims = (T, S, H, Hkv, D, qkv.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        cos, sin, pos, slot = ctx.saved_tensors
        T, S, H, Hkv, D, dtype = ctx.dims
        dout = _contig(dout).to(dtype)
        dqkv = torch.empty(T, dout.shape[1], dtype=dtype)
        rc = _lib.r1lab_rope_move(
            dout.data_ptr(), _half(dout), _ptr(cos), _ptr(sin), pos.data_ptr(), slot.data_ptr(),
            dqkv.data_ptr(), 1, T, S, _positions(cos, pos), H, Hkv, D, torch.get_num_threads(),
        )  # fmt: skip
        _ok(rc, "rope_scatter backward")
        return dqkv, None, None, None, None, None, None, None, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """HF's RMSNorm `w * (x * rsqrt(mean(x^2) + eps))` of x [T, d] fp32 contiguous, in `out_dtype`."""
    _need()
    _norm_args("rms_norm", x, w, None, out_dtype)
    return _Norm.apply(x, w, None, eps, False, out_dtype)


def _norm_args(fn: str, x, w, b, out_dtype) -> None:
    _arg(fn, "x", x, (torch.float32,), (None, None))
    _arg(fn, "the weight", w, (torch.float32,), (x.shape[1],))
    if b is not None:
        _arg(fn, "the bias", b, (torch.float32,), (x.shape[1],))
    if out_dtype not in _FLOATS:
        raise ValueError(f"train_kernels.{fn}: out_dtype must be float32 or bfloat16, got {out_dtype}")


def layer_norm(x, w, b, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """`F.layer_norm(x, (d,), w, b, eps)` of x [T, d] fp32 contiguous (b may be None), in `out_dtype`."""
    _need()
    _norm_args("layer_norm", x, w, b, out_dtype)
    return _Norm.apply(x, w, b, eps, True, out_dtype)


def gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (`approximate="tanh"`) of a contiguous fp32 or bf16 tensor [T, F], in its dtype."""
    _need()
    _arg("gelu_tanh", "u", u, _FLOATS, (None, None))
    return _Activation.apply(u, "gelu")


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gu [T, 2F] = [gate | up] (contiguous, fp32 or bf16): [T, F] in its dtype."""
    _need()
    _arg("swiglu", "gu", gu, _FLOATS, (None, None))
    if gu.shape[1] % 2:
        raise ValueError(f"train_kernels.swiglu: gu must have an even number of columns, got {gu.shape[1]}")
    return _Activation.apply(gu, "swiglu")


def rope_scatter(qkv, cos, sin, pos, slot, slots: int, heads: int, kv_heads: int, head_dim: int):
    """qkv [T, (H + 2 Hkv) D] -> [slots, (H + 2 Hkv) D]: row t at slot[t] with its q and k heads rotated
    by position pos[t] (cos/sin [P, D/2] fp32, HF's rotate_half convention; None: not rotated, for
    learned positions); other slots zero."""
    _need()
    fn, T = "rope_scatter", qkv.shape[0] if isinstance(qkv, torch.Tensor) else 0
    if head_dim % 2 or slots < 1:
        raise ValueError(
            f"train_kernels.{fn}: head_dim must be even and slots >= 1 (got {head_dim}, {slots})"
        )
    _arg(fn, "qkv", qkv, _FLOATS, (None, (heads + 2 * kv_heads) * head_dim))
    if (cos is None) != (sin is None):
        raise ValueError(f"train_kernels.{fn}: give both cos and sin tables, or neither")
    if cos is not None:
        _arg(fn, "cos", cos, (torch.float32,), (None, head_dim // 2))
        _arg(fn, "sin", sin, (torch.float32,), tuple(cos.shape))
    _arg(fn, "pos", pos, (torch.int64,), (T,))
    _arg(fn, "slot", slot, (torch.int64,), (T,))
    return _RopeScatter.apply(qkv, cos, sin, pos, slot, slots, heads, kv_heads, head_dim)


def rope_reference(qkv, cos, sin, pos, slot, slots: int, heads: int, kv_heads: int, head_dim: int):
    """`rope_scatter` in PyTorch (HF's `apply_rotary_pos_emb` formula), for the probe and tests."""
    T = qkv.shape[0]
    if cos is None:
        x = qkv.float()
        return x.new_zeros(slots, x.shape[1]).index_copy(0, slot, x).to(qkv.dtype)
    x = qkv.float().view(T, heads + 2 * kv_heads, head_dim)
    c = torch.cat([cos[pos], cos[pos]], -1)[:, None]  # [T, 1, D]
    s = torch.cat([sin[pos], sin[pos]], -1)[:, None]
    half = head_dim // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    qk = heads + kv_heads
    x = torch.cat([x[:, :qk] * c + rot[:, :qk] * s, x[:, qk:]], 1).reshape(T, -1)
    return x.new_zeros(slots, x.shape[1]).index_copy(0, slot, x).to(qkv.dtype)


def _probe() -> str | None:
    """Each kernel's values and gradients against PyTorch (fp32 and bf16); the first mismatch."""
    gen = torch.Generator().manual_seed(0)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]
        out = fn(*xs)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # the same for both
        out.float().backward(g)
        return [out.float()] + [x.grad.float() for x in xs if x.grad is not None]

    def close(got, want, half):
        tol = dict(atol=3e-2, rtol=3e-2) if half else dict(atol=1e-4, rtol=1e-4)
        return all(torch.allclose(a, b, **tol) for a, b in zip(got, want, strict=True))

    x, w = torch.randn(5, 40, generator=gen), torch.randn(40, generator=gen)
    for half in (False, True):
        dt = torch.bfloat16 if half else torch.float32

        def ref_norm(x, w, dt=dt):
            return (w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))).to(dt)

        if not close(grads(lambda a, b, dt=dt: rms_norm(a, b, 1e-6, dt), x, w), grads(ref_norm, x, w), half):
            return f"rms_norm (bf16={half})"
        b = torch.randn(40, generator=gen)
        got = grads(lambda a, c, e, dt=dt: layer_norm(a, c, e, 1e-5, dt), x, w, b)
        if not close(
            got, grads(lambda a, c, e, dt=dt: F.layer_norm(a, (40,), c, e, 1e-5).to(dt), x, w, b), half
        ):
            return f"layer_norm (bf16={half})"
        u = (torch.randn(3, 50, generator=gen) * 3).to(dt)
        if not close(grads(gelu_tanh, u), grads(lambda v: F.gelu(v.float(), approximate="tanh"), u), half):
            return f"gelu_tanh (bf16={half})"
        gu = (torch.randn(4, 48, generator=gen) * 4).to(dt)

        def ref_swiglu(u):
            g, up = u.float().chunk(2, -1)
            return F.silu(g) * up

        if not close(grads(swiglu, gu), grads(ref_swiglu, gu), half):
            return f"swiglu (bf16={half})"
        heads, kv, d = 4, 2, 16
        qkv = torch.randn(6, (heads + 2 * kv) * d, generator=gen).to(dt)
        ang = torch.rand(9, d // 2, generator=gen) * 6
        cos, sin = ang.cos(), ang.sin()
        pos, slot = torch.tensor([0, 1, 2, 0, 1, 8]), torch.tensor([0, 1, 2, 4, 5, 9])
        rest = (pos, slot, 11, heads, kv, d)
        for args in ((cos, sin, *rest), (None, None, *rest)):  # rotated, then a plain scatter
            got = grads(lambda q, a=args: rope_scatter(q, *a), qkv)
            if not close(got, grads(lambda q, a=args: rope_reference(q.float(), *a), qkv), half):
                return f"rope_scatter (bf16={half}, rope={args[0] is not None})"
    return None


def _get():
    global _lib, _tried, reason
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("R1LAB_NATIVE", "1") == "0":
                reason = "disabled by R1LAB_NATIVE=0"
                return None
            try:
                _lib = _load(cbuild.build(SOURCE))
                # the first caller may be inside no_grad, inference_mode or autocast: the probe needs none
                with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
                    failed = _probe()
                if failed:
                    reason = f"the built kernels disagreed with PyTorch on the probe: {failed}"
                    _lib = None
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                reason, _lib = f"could not build the training kernels: {e}", None
            except Exception as e:  # a probe that fails in any other way: fall back, never crash
                reason, _lib = f"the training kernels failed their probe: {type(e).__name__}: {e}", None
            if _lib is None:  # said once per process: training still works, only slower
                warnings.warn(
                    f"r1lab: {reason}; training runs Hugging Face's forward (~1.3x slower updates on CPU)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def _need():
    if _lib is None and _get() is None:
        raise RuntimeError(f"the training kernels are not available: {reason}")


def available() -> bool:
    """Whether the kernels are built, loaded and probed (builds them on the first call)."""
    return _get() is not None
