"""Cost accounting: FLOPs of a run from its token counts, wall time and dollars here or on a named GPU.

The model is the standard dense-transformer approximation (Kaplan et al. 2020; Chinchilla):

* a forward pass costs 2N FLOPs per token (N = parameters: one multiply-add per weight),
* a training step (forward + backward) costs 6N per token,

so a GRPO run costs 2N per generated token and per prompt token of its rollouts (a prompt is read
once for its whole group: vLLM's prefix cache and r1lab's CPU engine share it), 6N per token it trains on
(prompt + completion, once per epoch over the batch), and 2N per token for each extra forward pass:
the frozen reference model when the KL penalty is on, and the old policy's log-probs when a batch is
reused for several epochs. Attention's own FLOPs (about 2 x layers x context x width per token) are
left out: at the context lengths of these recipes they are a few percent of 2N.

Wall time is FLOPs / (peak x utilisation). *Here*, the peak is measured (`measure_matmul_peak`: big
square matmuls, best of a few, over the GEMM libraries PyTorch has: MKL and oneDNN) and the achieved
fractions default to what this project measured on a 2-core CPU for models of ~30M parameters:
about 0.35 of the matmul peak while generating (token-by-token decoding is memory- and
overhead-bound; 0.45-0.5 at batch 64 without early stops) and 0.5 while training (large batched
matmuls; 0.49-0.51 for the GRPO update at qwen2-34m on the AVX-512 EPYC, in bf16 and fp32). Tiny models (a few M parameters) reach less while generating (~0.2): Python overhead per
token dominates. *On a GPU*, the peak is the datasheet's dense bf16 figure (`GPU_SPECS`) and the
utilisation is a stated MFU, separately for training (~0.4 is typical of a tuned trainer) and for
generation (~0.2: decoding is bound by memory bandwidth, even with vLLM's large batches).

Dollars are wall hours x price per hour x GPUs; `$ / M generated tokens` prices the generation
phase alone, per million completion tokens: what a rollout or an evaluation costs per unit of text.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_flops: float  # dense (no sparsity) bf16 tensor-core peak, FLOP/s, with fp32 accumulation
    price_per_hour: float  # a typical 2025 on-demand cloud price per GPU in US$; pass your own
    memory_gb: float


#: Datasheet peaks (NVIDIA). H200 has H100's compute with more and faster memory; the RTX 4090 figure
#: is with fp32 accumulation (what PyTorch uses), half its fp16-accumulate number.
GPU_SPECS: dict[str, GPUSpec] = {
    "H100": GPUSpec("H100 SXM", 989e12, 3.00, 80),
    "H200": GPUSpec("H200 SXM", 989e12, 3.80, 141),
    "A100": GPUSpec("A100 SXM 80GB", 312e12, 1.80, 80),
    "L4": GPUSpec("L4", 121e12, 0.80, 24),
    "RTX4090": GPUSpec("RTX 4090", 165e12, 0.60, 24),
}

#: Fractions of the measured matmul peak reached here (see the module docstring).
DEFAULT_GEN_FRACTION = 0.35
DEFAULT_TRAIN_FRACTION = 0.5
#: Model FLOPs utilisation assumed on a GPU.
DEFAULT_MFU = 0.4
DEFAULT_GEN_MFU = 0.2


def gpu_spec(name: str) -> GPUSpec:
    """Look a GPU up by name, forgivingly (`h100`, `RTX 4090`, `rtx4090`).

    >>> gpu_spec("rtx 4090").bf16_flops
    165000000000000.0
    """
    key = name.upper().replace(" ", "").replace("-", "")
    if key not in GPU_SPECS:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(GPU_SPECS)}")
    return GPU_SPECS[key]


def gemm_kernels(a, b) -> dict[str, object]:
    """The ways PyTorch can multiply a [n, k] by b [k, m] on this device, as zero-argument callables.

    `torch.mm` is what `a @ b` dispatches to (on x86 CPUs, MKL for fp32 and oneDNN for bf16); on CPU,
    `onednn` is oneDNN's GEMM on a pre-packed weight, what the rollout engine runs. They differ a lot
    by CPU vendor: on an AMD EPYC with AVX-512 (Zen 5) MKL's fp32 GEMM runs AVX2 code at ~195 GFLOP/s
    where oneDNN's reaches ~460, so a roofline against `torch.mm` alone would flatter everything
    measured against it.
    """
    import torch

    kernels = {"torch.mm": lambda: a @ b}
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if a.device.type == "cpu" and mkldnn is not None and torch.backends.mkldnn.is_available():
        try:
            packed = mkldnn._reorder_linear_weight(b.t().contiguous(), a.shape[0])  # [m, k] as a linear
            mkldnn._linear_pointwise(a, packed, None, "none", [], "")
            kernels["onednn"] = lambda: mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        except (RuntimeError, AttributeError):  # no oneDNN kernel for this dtype on this CPU
            pass
    return kernels


def measure_matmul_peak(dtype: str = "float32", seconds: float = 2.0, device: str = "cpu") -> float:
    """Best FLOP/s of square matmuls on this machine, sized so one product takes >= ~20 ms, over every
    GEMM library PyTorch can use here (`gemm_kernels`).

    The size doubles from 256 until a product is slow enough to time (or hits 2048 on CPU, 8192 on
    GPU); then batches of products are timed, each library in turn, until `seconds` have passed, and
    the best batch wins.
    """
    import torch

    dt = getattr(torch, dtype)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cap = 8192 if dev.type == "cuda" else 2048
    deadline = time.perf_counter() + seconds

    def timed(fn, reps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return time.perf_counter() - t0

    n = 256
    while True:
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        fns = list(gemm_kernels(a, b).values())
        for fn in fns:
            timed(fn, 1)  # warm-up: thread pools, kernel selection
        one = min(timed(fn, 1) for fn in fns)
        if one >= 0.02 or n >= cap or time.perf_counter() > deadline:
            break
        n *= 2
    reps = max(1, int(0.1 / max(one, 1e-6)))  # ~0.1 s per timed batch
    best = 2 * n**3 / one
    for _ in range(3):  # at least a few batches, then as many as the time allows
        best = max(best, *(2 * n**3 * reps / timed(fn, reps) for fn in fns))
    while time.perf_counter() < deadline:
        best = max(best, *(2 * n**3 * reps / timed(fn, reps) for fn in fns))
    return best


def count_checkpoint_params(path: str | Path) -> int | None:
    """Parameters stored in a Hugging Face directory's `*.safetensors` files, from their headers only.

    A safetensors file starts with an 8-byte little-endian header length and a JSON header giving
    every tensor's shape, so counting reads a few KB, not the weights. Tied weights are stored once
    and counted once. None when the directory holds no safetensors file.
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


@dataclass(frozen=True)
class Workload:
    """What a run computes, in tokens by kind of work, for a model of `n_params` parameters."""

    n_params: float
    gen_tokens: float = 0.0  # completion tokens decoded by the sampler (2N each)
    prefill_tokens: float = 0.0  # prompt tokens the sampler reads, once per prompt (2N each)
    train_tokens: float = 0.0  # tokens through forward + backward, summed over epochs (6N each)
    extra_forward_tokens: float = 0.0  # reference-model and old-policy forwards (2N each)

    def gen_flops(self) -> float:
        return 2 * self.n_params * (self.gen_tokens + self.prefill_tokens)

    def train_flops(self) -> float:
        return 6 * self.n_params * self.train_tokens + 2 * self.n_params * self.extra_forward_tokens

    def __add__(self, other: Workload) -> Workload:
        if other.n_params != self.n_params:
            raise ValueError("workloads of different models do not add")
        return Workload(
            self.n_params,
            self.gen_tokens + other.gen_tokens,
            self.prefill_tokens + other.prefill_tokens,
            self.train_tokens + other.train_tokens,
            self.extra_forward_tokens + other.extra_forward_tokens,
        )


def eval_workload(
    n_params: float, problems: int, k: int, prompt_tokens: float, completion_tokens: float
) -> Workload:
    """An evaluation: each prompt read once (its k samples share the prefill), k completions decoded.

    >>> eval_workload(1e6, problems=10, k=4, prompt_tokens=50, completion_tokens=100).gen_flops()
    9000000000.0
    """
    return Workload(
        n_params, gen_tokens=problems * k * completion_tokens, prefill_tokens=problems * prompt_tokens
    )


def grpo_workload(
    n_params: float,
    steps: int,
    prompts_per_step: int,
    group_size: int,
    prompt_tokens: float,
    completion_tokens: float,
    epochs: int = 1,
    reference: bool = False,
    recompute_old_logp: bool = False,
) -> Workload:
    """A GRPO run: per step, P prompts x G samples are generated, then trained on for `epochs` passes.

    >>> w = grpo_workload(1e6, steps=10, prompts_per_step=4, group_size=8, prompt_tokens=20,
    ...                   completion_tokens=100, epochs=2, reference=True, recompute_old_logp=True)
    >>> w.gen_tokens, w.train_tokens, w.extra_forward_tokens   # 320 sequences of 120 tokens
    (32000, 76800, 76800)
    """
    seqs = steps * prompts_per_step * group_size
    per_pass = seqs * (prompt_tokens + completion_tokens)
    extra_passes = int(reference) + int(recompute_old_logp and epochs > 1)
    return Workload(
        n_params,
        gen_tokens=seqs * completion_tokens,
        prefill_tokens=steps * prompts_per_step * prompt_tokens,  # a group shares its prompt's prefill
        train_tokens=per_pass * epochs,
        extra_forward_tokens=per_pass * extra_passes,
    )


def sft_workload(n_params: float, tokens: float, epochs: int = 1) -> Workload:
    """Supervised fine-tuning: every token of the data through forward and backward, once per epoch.

    >>> sft_workload(1e6, tokens=1000, epochs=3).train_flops()
    18000000000.0
    """
    return Workload(n_params, train_tokens=tokens * epochs)


def _phase(flops: float, rate: float) -> float:
    return flops / rate if flops > 0 else 0.0


def estimate(
    work: Workload,
    here_peak: float,
    gpu: GPUSpec,
    mfu: float = DEFAULT_MFU,
    gen_mfu: float = DEFAULT_GEN_MFU,
    price_per_hour: float | None = None,
    n_gpus: int = 1,
    gen_fraction: float = DEFAULT_GEN_FRACTION,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    local_price_per_hour: float = 0.0,
    here_train_peak: float | None = None,
) -> dict:
    """FLOPs, wall time and dollars of `work` here and on `n_gpus` x `gpu` (a JSON-ready dict).

    `here_peak` is this machine's measured matmul FLOP/s for generation (`here_train_peak` for
    training, when it trains in another dtype). `price_per_hour` is per GPU (default: the spec's).
    """
    for name, value in (
        ("mfu", mfu),
        ("gen_mfu", gen_mfu),
        ("gen_fraction", gen_fraction),
        ("train_fraction", train_fraction),
    ):
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    price = gpu.price_per_hour if price_per_hour is None else price_per_hour
    gen_f, train_f = work.gen_flops(), work.train_flops()

    def column(gen_rate: float, train_rate: float, hourly: float) -> dict:
        gen_s, train_s = _phase(gen_f, gen_rate), _phase(train_f, train_rate)
        total_s = gen_s + train_s
        per_m = gen_s / 3600 * hourly / (work.gen_tokens / 1e6) if work.gen_tokens else None
        return {
            "gen_seconds": gen_s,
            "train_seconds": train_s,
            "seconds": total_s,
            "dollars": total_s / 3600 * hourly,
            "dollars_per_million_generated": per_m,
            "price_per_hour": hourly,
        }

    train_peak = here_train_peak or here_peak
    here = column(here_peak * gen_fraction, train_peak * train_fraction, local_price_per_hour)
    here.update(
        peak_flops=here_peak,
        train_peak_flops=train_peak,
        gen_fraction=gen_fraction,
        train_fraction=train_fraction,
    )
    on_gpu = column(gpu.bf16_flops * gen_mfu * n_gpus, gpu.bf16_flops * mfu * n_gpus, price * n_gpus)
    on_gpu.update(gpu=gpu.name, n_gpus=n_gpus, peak_flops=gpu.bf16_flops, mfu=mfu, gen_mfu=gen_mfu)
    return {
        "workload": asdict(work),
        "flops": {"generation": gen_f, "training": train_f, "total": gen_f + train_f},
        "here": here,
        "gpu": on_gpu,
    }


# --------------------------------------------------------------------------- formatting (tables, report)


def fmt_si(x: float | None, unit: str = "") -> str:
    """Human-readable magnitude.

    >>> fmt_si(3.2e15, "FLOP"), fmt_si(1234.0), fmt_si(None)
    ('3.20 PFLOP', '1.23 k', '-')
    """
    if x is None:
        return "-"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def fmt_duration(seconds: float | None) -> str:
    """Seconds as the largest sensible unit.

    >>> fmt_duration(42.0), fmt_duration(5400.0), fmt_duration(3 * 86400.0)
    ('42.0 s', '90.0 min', '3.00 days')
    """
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.2f} days"


def fmt_dollars(x: float | None) -> str:
    """Dollars: cents, three significant digits below a cent, and no sub-0.01-cent noise.

    >>> fmt_dollars(1234.5), fmt_dollars(0.0), fmt_dollars(0.000123), fmt_dollars(0.005), fmt_dollars(4e-8)
    ('$1,234.50', '$0.00', '$0.000123', '$0.005', '<$0.0001')
    """
    if x is None:
        return "-"
    if x >= 0.01 or x <= 0:
        return f"${x:,.2f}"
    if x < 1e-4:
        return "<$0.0001"
    digits = 2 - math.floor(math.log10(x))  # three significant digits, never scientific notation
    return "$" + f"{x:.{digits}f}".rstrip("0")
