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
"""

from __future__ import annotations

import time

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
