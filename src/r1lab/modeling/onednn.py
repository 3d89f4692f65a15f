"""fp32 linear layers through oneDNN when training on CPU, where it is the faster GEMM.

PyTorch sends an fp32 `F.linear` on x86 CPUs to MKL. On AMD CPUs MKL runs its AVX2 code even where
the CPU has AVX-512: on the 2-core AVX-512 EPYC (Zen 5) this project measures, MKL's fp32 GEMM
reaches ~195 GFLOP/s and oneDNN's (also inside PyTorch, `torch.ops.mkldnn`) ~460. bf16 matmuls
already go to oneDNN, so only fp32 training gains.

`use_onednn_linears(model)` turns the model's `nn.Linear` modules (and GPT-2's `Conv1D`, a linear
layer with its weight stored transposed) into subclasses whose forward and backward (input and
weight gradients) run oneDNN's GEMM when the call is fp32 on CPU outside autocast, and the original
forward otherwise (bf16 autocast, GPUs, other dtypes). The weights, the state dict and the
checkpoints are unchanged. It is used only where this machine measures oneDNN
faster (`onednn_is_faster`: a probe of ~0.1 s, once per process, which also checks the results
against `F.linear`). Measured (benchmarks/train_throughput.py, 64 GRPO rows, 2 threads, AVX-512
EPYC): the fp32 GRPO update 1.5x faster at qwen2-4m (0.66 -> 0.43 s) and 1.6x at qwen2-34m
(4.10 -> 2.58 s), with the same parameters to fp32 rounding.

    n = use_onednn_linears(model)   # number of layers switched (0 where oneDNN does not win)

`packed_linear` is the GEMM of r1lab's own training forward (`fused.py`), fp32 or bf16: the weights
are cast, concatenated (q|k|v, gate|up) and packed by oneDNN once per `fixed_weights` block (the
micro-batches between two optimiser steps), for the forward and for the input gradient. Packed,
oneDNN's GEMM runs 12-15% (bf16) and 25-35% (fp32) faster than on plain weights at training shapes
(e.g. [1798, 512] x [512, 4608]: 910-990 vs 590-720 GFLOP/s in bf16, AVX-512 EPYC, 2 threads),
and packing the 34M model's weights both ways costs ~28 ms (bf16). The weight gradient multiplies two
activations and runs unpacked.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

_faster: bool | None = None  # the probe's answer, once per process


def _mkldnn():
    ops = getattr(torch.ops, "mkldnn", None)
    return ops if ops is not None and torch.backends.mkldnn.is_available() else None


def _mm(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [N, in] @ w.T + b by oneDNN; w [out, in] (a strided view is fine: oneDNN reads strides)."""
    return torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    """x2 [N, in] -> [N, out]. 2-D in and out: a view made inside a Function could not be modified
    in place by the caller, so `_linear` reshapes around it."""

    @staticmethod
    def forward(ctx, x2, weight, bias):
        ctx.save_for_backward(x2, weight)
        return _mm(x2, weight, bias)  # [N, out]

    @staticmethod
    def backward(ctx, g2):
        x2, weight = ctx.saved_tensors  # g2 [N, out]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(g2, weight.t())  # [N, out] @ [out, in]
        if ctx.needs_input_grad[1]:
            # [out, N] @ [N, in]; oneDNN wants the reduction dim last in both operands
            gw = _mm(g2.t().contiguous(), x2.t().contiguous())  # [out, in]
        if ctx.needs_input_grad[2]:  # False when there is no bias
            gb = g2.sum(0)  # [out]
        return gx, gw, gb


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] through `_OneDNNLinearFn`."""
    y = _OneDNNLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias)  # [N, out]
    return y.view(*x.shape[:-1], weight.shape[0])


def _oneDNN_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.numel() > 0
    )


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose fp32 CPU forward and backward run oneDNN's GEMM (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _oneDNN_applies(x, self.weight):
            return _linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class OneDNNConv1D(Conv1D):
    """GPT-2's `Conv1D` (weight [in, out]) with the same oneDNN path: a linear layer of weight.T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _oneDNN_applies(x, self.weight):
            return _linear(x, self.weight.t(), self.bias)  # the gradient flows through .t()
        return super().forward(x)


_SWAPS = {nn.Linear: OneDNNLinear, Conv1D: OneDNNConv1D}


def onednn_is_faster() -> bool:
    """Whether oneDNN computes fp32 linear layers correctly and >= 1.2x faster than `F.linear` here.

    Checked once per process on a training-shaped product (forward and both gradients of a
    [1024, 256] x [1024, 256]^T layer), with the caller's thread count.
    """
    global _faster
    if _faster is None:
        # the first caller may be inside no_grad, inference_mode or autocast: the probe needs none
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            _faster = _probe()
    return _faster


def _probe() -> bool:
    if _mkldnn() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=gen, requires_grad=True)
    w = torch.randn(1024, 256, generator=gen, requires_grad=True)
    g = torch.randn(1024, 1024, generator=gen)

    def run(fn) -> tuple[float, list[torch.Tensor]]:
        best = float("inf")
        for _ in range(4):
            x.grad = w.grad = None
            t0 = time.perf_counter()
            fn(x, w).backward(g)
            best = min(best, time.perf_counter() - t0)
        return best, [fn(x, w).detach(), x.grad.clone(), w.grad.clone()]

    try:
        ref_s, ref = run(lambda a, b: F.linear(a, b))
        got_s, got = run(lambda a, b: _linear(a, b, None))
    except (RuntimeError, AttributeError):
        return False
    scale = float(ref[0].abs().max())
    if not all(torch.allclose(p, q, atol=1e-4 * scale, rtol=1e-4) for p, q in zip(got, ref, strict=True)):
        return False
    return got_s * 1.2 <= ref_s


def use_onednn_linears(model: nn.Module) -> int:
    """Switch the model's linear layers to their oneDNN subclasses where oneDNN wins here; how many.

    Only modules of exactly `nn.Linear` or `Conv1D` are switched (a subclass may have a forward of
    its own); switching changes the class, nothing else, so it survives `deepcopy` and saving."""
    if next(model.parameters()).device.type != "cpu" or not onednn_is_faster():
        return 0
    n = 0
    for m in model.modules():
        swap = _SWAPS.get(type(m))
        if swap is not None:
            m.__class__ = swap
            n += 1
    return n


# ---- linear layers on oneDNN-packed weights, for r1lab's own training forward (fused.py) ----


class _Packs:
    """A weight W [out, in] in the matmul dtype, packed by oneDNN for `x @ W.T` (the forward) and,
    made at the first backward, W.T packed for `g @ W` (the input gradient). Made from the
    parameters as they were: valid inside one `fixed_weights` block (`key` names the tensors, so a
    different set of parameters under the same name is packed anew)."""

    def __init__(self, key: tuple, w: torch.Tensor, rows: int):
        self.key, self.w, self.rows = key, w, rows
        self.fwd = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        self._bwd: torch.Tensor | None = None

    @property
    def bwd(self) -> torch.Tensor:
        if self._bwd is None:
            self._bwd = torch.ops.mkldnn._reorder_linear_weight(self.w.t().contiguous(), self.rows)
        return self._bwd


class _PackCache(dict):
    """A module's packs by name. Never copied or pickled (oneDNN's packed tensors have no storage to
    copy, and a copy's parameters are other tensors anyway): a deep copy or unpickled module starts
    with an empty cache."""

    def __deepcopy__(self, memo):
        return _PackCache()

    def __reduce__(self):
        return (_PackCache, ())


_live: dict[int, _PackCache] | None = None  # the caches filled inside the current `fixed_weights` block


@contextmanager
def fixed_weights():
    """A block in which no parameter changes (the micro-batches between two optimiser steps, a
    no-grad scoring pass): `packed_linear` packs each weight once in it and reuses the pack; outside
    one, every call packs afresh. (Parameters' version counters cannot tell: fused AdamW updates
    weights in place without bumping them.) Re-entrant; the packs are dropped when the outermost
    block ends."""
    global _live
    outer = _live
    if outer is None:
        _live = {}
    try:
        yield
    finally:
        if outer is None:
            for cache in _live.values():
                cache.clear()
            _live = None


def _packs(
    owner: nn.Module, name: str, weights: list, transposed: bool, dtype: torch.dtype, rows: int
) -> _Packs:
    """The packs of cat(weights) (each [out_i, in], or [in, out_i] GPT-2 style when `transposed`);
    inside `fixed_weights`, made once and cached on `owner`."""
    key = (dtype, transposed, *(p.data_ptr() for p in weights))
    cache = owner.__dict__.setdefault("_r1lab_packs", _PackCache()) if _live is not None else None
    entry = cache.get(name) if cache is not None else None
    if entry is None or entry.key != key:
        with torch.no_grad():
            parts = [p.t() if transposed else p for p in weights]
            w = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtype).contiguous()
        entry = _Packs(key, w, rows)
        if cache is not None:
            cache[name] = entry
            _live[id(cache)] = cache
    return entry


class _PackedLinearFn(torch.autograd.Function):
    """x [N, in] (the matmul dtype) -> x @ cat(weights).T + cat(biases), [N, out] in that dtype, with
    the weights' gradients in their own dtype (fp32) and layout, split back per parameter."""

    @staticmethod
    def forward(ctx, x, packs: _Packs, n_weights: int, transposed: bool, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        b = None
        if biases:
            b = (torch.cat(biases) if len(biases) > 1 else biases[0]).to(x.dtype)
        ctx.save_for_backward(x)
        ctx.packs, ctx.n_weights, ctx.transposed = packs, n_weights, transposed
        ctx.splits = [p.shape[1] if transposed else p.shape[0] for p in weights]
        ctx.has_bias = bool(biases)
        return torch.ops.mkldnn._linear_pointwise(x, packs.fwd, b, "none", [], "")

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g = g.to(x.dtype).contiguous()
        need = ctx.needs_input_grad
        gx = torch.ops.mkldnn._linear_pointwise(g, ctx.packs.bwd, None, "none", [], "") if need[0] else None
        grads: list[torch.Tensor | None] = [None] * (len(need) - 4)
        if any(need[4 : 4 + ctx.n_weights]):
            if x.dtype == torch.float32:  # oneDNN wants the reduction dim last in both operands
                gw = _mm(g.t().contiguous(), x.t().contiguous())  # [out, in]
            else:
                gw = g.t() @ x  # [out, in]; bf16 matmuls are oneDNN's already
            for i, part in enumerate(gw.float().split(ctx.splits)):
                grads[i] = part.t() if ctx.transposed else part
        if ctx.has_bias and any(need[4 + ctx.n_weights :]):
            gb = g.float().sum(0)
            for j, part in enumerate(gb.split(ctx.splits)):
                grads[ctx.n_weights + j] = part
        return (gx, None, None, None, *grads)


def packed_linear(
    x, owner: nn.Module, name: str, weights, biases=(), transposed: bool = False
) -> torch.Tensor:
    """`x @ cat(weights).T + cat(biases)` for x [N, in] fp32 or bf16, the matmuls in x's dtype on
    weights packed once per `fixed_weights` block (cached on `owner` under `name`), else per call."""
    packs = _packs(owner, name, list(weights), transposed, x.dtype, x.shape[0])
    return _PackedLinearFn.apply(x, packs, len(weights), transposed, *weights, *biases)
