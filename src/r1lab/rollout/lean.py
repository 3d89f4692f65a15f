"""The CPU engine's copy of a model's weights, laid out for the lean forward of `kernels.py`.

`lean_from_hf(model, dtype)` reads a supported Hugging Face causal LM once: q/k/v fused into one
matrix, gate and up fused, GPT-2's Conv1D weights transposed, biases concatenated. It returns a
`LeanModel`, or a reason string when the architecture or configuration is not one `kernels.py`
reproduces exactly (the engine then falls back to the HF forward). `ensure_rope` fills the model's
cos/sin table with its own rotary module; `pack_weights` re-lays the matmul weights for oneDNN.

Precision: `LeanModel.dtype` is the dtype of the activations, the residual stream, the norms,
attention and the KV cache, and it is always fp32; `mm_dtype` is the dtype of the matmul weights
and of the matmuls' inputs and outputs: fp32, or bf16 for an engine in bfloat16 (what
`torch.autocast` does: bf16 GEMMs with fp32 accumulation, everything else in fp32). On a CPU with
native bf16 dot products (AVX512-BF16, AMX) bf16 GEMMs run at 2-4x the fp32 rate; without them
PyTorch emulates bf16 and it is much slower than fp32.

The matmul weights are re-laid once in oneDNN's packed format (`pack_weights`), which beat MKL's
`F.linear` on every CPU measured: on the 2-core AVX2 EPYC +7% tokens/s on qwen2-4m and +22% on
qwen2-34m at batch 64; on the 2-core AVX-512 EPYC (Zen 5) MKL's fp32 GEMM runs AVX2 code at
~190 GFLOP/s where oneDNN's runs at ~450.

Architectures: `gpt2` (learned positions, LayerNorm, GELU, fused c_attn) and the Llama family
(`llama`, `qwen2`, `mistral`: RoPE, RMSNorm, SwiGLU, GQA, optional q/k/v bias). Anything else, or a
configuration `kernels.py` does not reproduce exactly (sliding windows, dynamic RoPE), makes
`lean_from_hf` return a reason string and the engine falls back to the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: RoPE variants whose cos/sin depend on the position only (not on the sequence length), so a table
#: computed once by the model's own rotary module is exact.
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_LLAMA_FAMILY = ("llama", "qwen2", "mistral")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass
class LeanLayer:
    norm1_w: torch.Tensor  # [d]
    norm1_b: torch.Tensor | None  # [d] (LayerNorm only)
    qkv_w: torch.Tensor  # [(H + 2*H_kv) * D, d]
    qkv_b: torch.Tensor | None  # [(H + 2*H_kv) * D]
    o_w: torch.Tensor  # [d, H * D]
    o_b: torch.Tensor | None  # [d]
    norm2_w: torch.Tensor  # [d]
    norm2_b: torch.Tensor | None  # [d]
    up_w: torch.Tensor  # [F, d] (GPT-2) or [2F, d] (gate and up fused, SwiGLU)
    up_b: torch.Tensor | None  # [F] or [2F]
    down_w: torch.Tensor  # [d, F]
    down_b: torch.Tensor | None  # [d]
    scale: float  # attention scale of this layer


@dataclass
class LeanModel:
    """Weights of a supported decoder, laid out for `kernels.prefill`/`kernels.decode_step`: the
    matmul weights in `mm_dtype`, the rest (embeddings, norms, RoPE tables) in fp32."""

    arch: str  # "gpt2" (learned positions, LayerNorm) or "llama" (RoPE, RMSNorm)
    act: str  # "swiglu", "gelu_tanh" or "gelu"
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    max_len: int  # positions the model was built for
    embed: torch.Tensor  # [V, d]
    pos_embed: torch.Tensor | None  # [max_len, d] (GPT-2)
    rotary: torch.nn.Module | None  # the HF rotary module, used once per table size (Llama family)
    final_w: torch.Tensor  # [d]
    final_b: torch.Tensor | None  # [d]
    lm_head: torch.Tensor  # [V, d]
    layers: list[LeanLayer]
    dtype: torch.dtype  # activations, norms, attention, KV cache: float32
    mm_dtype: torch.dtype  # matmul weights, inputs and outputs: float32 or bfloat16
    cos: torch.Tensor | None = None  # [T_table, D/2], filled by `ensure_rope`
    sin: torch.Tensor | None = None  # [T_table, D/2]

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _t(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A CPU copy in `dtype` (the engine runs on CPU even when the trainer's model is on a GPU)."""
    return None if x is None else x.detach().to(device="cpu", dtype=dtype).contiguous()


def _cat_bias(*linears, dtype) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    parts = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears]
    return torch.cat([p.detach().cpu() for p in parts]).to(dtype).contiguous()


def lean_from_hf(model: torch.nn.Module, dtype: torch.dtype) -> LeanModel | str:
    """Copy a supported HF causal LM into a `LeanModel` whose matmuls run in `dtype` (fp32 or bf16;
    everything else is fp32), or return why it is not supported."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype} has no lean forward"
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind == "gpt2":
        return _gpt2(model, dtype)
    if kind in _LLAMA_FAMILY:
        return _llama(model, dtype)
    return f"model_type {kind!r} has no lean forward"


_F32 = torch.float32


def _gpt2(model, dtype) -> LeanModel | str:
    cfg = model.config
    if cfg.activation_function not in (*_GELU_TANH, "gelu"):
        return f"gpt2 activation {cfg.activation_function!r} not supported"
    if getattr(cfg, "add_cross_attention", False):
        return "gpt2 with cross-attention not supported"
    tr = model.transformer
    h, d = cfg.n_head, cfg.n_embd
    layers = []
    for i, blk in enumerate(tr.h):
        scale = (d // h) ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        # Conv1D stores [in, out]; F.linear wants [out, in]: transpose once here, never per step.
        layers.append(
            LeanLayer(
                norm1_w=_t(blk.ln_1.weight, _F32),
                norm1_b=_t(blk.ln_1.bias, _F32),
                qkv_w=_t(blk.attn.c_attn.weight.t(), dtype),
                qkv_b=_t(blk.attn.c_attn.bias, dtype),
                o_w=_t(blk.attn.c_proj.weight.t(), dtype),
                o_b=_t(blk.attn.c_proj.bias, dtype),
                norm2_w=_t(blk.ln_2.weight, _F32),
                norm2_b=_t(blk.ln_2.bias, _F32),
                up_w=_t(blk.mlp.c_fc.weight.t(), dtype),
                up_b=_t(blk.mlp.c_fc.bias, dtype),
                down_w=_t(blk.mlp.c_proj.weight.t(), dtype),
                down_b=_t(blk.mlp.c_proj.bias, dtype),
                scale=scale,
            )
        )
    return LeanModel(
        arch="gpt2",
        act="gelu_tanh" if cfg.activation_function in _GELU_TANH else "gelu",
        n_heads=h,
        n_kv_heads=h,
        head_dim=d // h,
        eps=cfg.layer_norm_epsilon,
        max_len=cfg.n_positions,
        embed=_t(tr.wte.weight, _F32),
        pos_embed=_t(tr.wpe.weight, _F32),
        rotary=None,
        final_w=_t(tr.ln_f.weight, _F32),
        final_b=_t(tr.ln_f.bias, _F32),
        lm_head=_t(model.lm_head.weight, dtype),
        layers=layers,
        dtype=_F32,
        mm_dtype=dtype,
    )


def _llama(model, dtype) -> LeanModel | str:
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"{cfg.model_type} activation {cfg.hidden_act!r} not supported"
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        return f"{cfg.model_type} with sliding-window layers not supported"
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return "mistral with a sliding window not supported"
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") not in _STATIC_ROPE:
        return f"rope type {rotary.rope_type!r} depends on sequence length; not supported"
    base = model.model
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    layers = []
    for blk in base.layers:
        at, mlp = blk.self_attn, blk.mlp
        layers.append(
            LeanLayer(
                norm1_w=_t(blk.input_layernorm.weight, _F32),
                norm1_b=None,
                qkv_w=_t(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]), dtype),
                qkv_b=_cat_bias(at.q_proj, at.k_proj, at.v_proj, dtype=dtype),
                o_w=_t(at.o_proj.weight, dtype),
                o_b=_t(at.o_proj.bias, dtype),
                norm2_w=_t(blk.post_attention_layernorm.weight, _F32),
                norm2_b=None,
                up_w=_t(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), dtype),
                up_b=_cat_bias(mlp.gate_proj, mlp.up_proj, dtype=dtype),
                down_w=_t(mlp.down_proj.weight, dtype),
                down_b=_t(mlp.down_proj.bias, dtype),
                scale=getattr(at, "scaling", head_dim**-0.5),
            )
        )
    return LeanModel(
        arch="llama",
        act="swiglu",
        n_heads=h,
        n_kv_heads=hkv,
        head_dim=head_dim,
        eps=cfg.rms_norm_eps,
        max_len=cfg.max_position_embeddings,
        embed=_t(base.embed_tokens.weight, _F32),
        pos_embed=None,
        rotary=rotary,
        final_w=_t(base.norm.weight, _F32),
        final_b=None,
        lm_head=_t(model.lm_head.weight, dtype),
        layers=layers,
        dtype=_F32,
        mm_dtype=dtype,
    )


def ensure_rope(lm: LeanModel, n_positions: int) -> None:
    """Fill the cos/sin table for positions `0..n_positions-1` with the model's own rotary module.

    HF concatenates the frequencies twice (`cat(freqs, freqs)`); keeping one half is enough because
    `_rope` rotates the two halves of each head with the same angles.
    """
    if lm.rotary is None or (lm.cos is not None and lm.cos.shape[0] >= n_positions):
        return
    dev = next(iter(lm.rotary.buffers()), torch.empty(0)).device  # the trainer's device (inv_freq)
    pos = torch.arange(n_positions, device=dev)[None]  # [1, T]
    probe = torch.zeros(1, dtype=torch.float32, device=dev)
    cos, sin = lm.rotary(probe, pos)  # [1, T, D] each
    half = lm.head_dim // 2
    lm.cos = cos[0, :, :half].to(device="cpu", dtype=lm.dtype).contiguous()  # [T, D/2]
    lm.sin = sin[0, :, :half].to(device="cpu", dtype=lm.dtype).contiguous()  # [T, D/2]


def pack_weights(lm: LeanModel, batch_hint: int = 64) -> bool:
    """Re-lay the matmul weights in oneDNN's blocked format, in place; False if unavailable.

    oneDNN's packed GEMM beats MKL's `F.linear` for the projections of decoding on both CPUs
    measured: on the 2-core AVX2 EPYC e.g. 512 -> 4608 at 64 rows ~50 vs ~31 GFLOP/s single-threaded
    (the whole engine +7-22%, benchmarks/rollout_vs_hf.py, ablation `pack`); on the AVX-512 EPYC
    (Zen 5) 2.3-2.9x in fp32, and in bf16 ~15% over the unpacked oneDNN call F.linear makes.
    Packing is checked against F.linear on a probe, and skipped if anything disagrees.
    """
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or mkldnn is None:
        return False
    try:
        w0, b0 = lm.layers[0].qkv_w, lm.layers[0].qkv_b
        probe = torch.randn(3, w0.shape[1]).to(lm.mm_dtype)
        packed = mkldnn._reorder_linear_weight(w0, batch_hint)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, b0, "none", [], "").float()
        want = F.linear(probe, w0, b0).float()
        tol = 1e-4 if lm.mm_dtype == torch.float32 else 2e-2  # bf16 outputs round at 2^-8
        if not torch.allclose(got, want, atol=tol, rtol=tol):
            return False
    except (RuntimeError, AttributeError):
        return False
    for w in lm.layers:
        for name in ("qkv_w", "o_w", "up_w", "down_w"):
            setattr(w, name, mkldnn._reorder_linear_weight(getattr(w, name), batch_hint))
    lm.lm_head = mkldnn._reorder_linear_weight(lm.lm_head, batch_hint)
    return True
