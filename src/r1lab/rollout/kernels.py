"""The lean forward of the CPU engine: GPT-2 and Qwen2/Llama decoders as small pure functions.

Hugging Face modules are written for training and for every model ever published; on a 2-core CPU
their per-layer Python (cache objects, mask builders, dispatch) costs as much as the arithmetic of a
tiny model. Here the weights are read from the HF module once (`lean_from_hf`: q/k/v fused into one
matrix, GPT-2's Conv1D weights transposed, gate and up fused) and the forward is a handful of torch
calls per layer:

* `prefill(lm, tokens, seq_lens)` runs several prompts packed into one `[N, d]` sequence (no padding):
  the linear layers see all tokens at once; attention is causal within each prompt. It returns the
  logits at each prompt's last position and every layer's keys/values for the engine to cache.
  With the C kernels it runs the same layer loop as the decode step (`_layers_native`).
* `decode_step(lm, cache, tokens, pos, n_ctx)` advances `B` rows by one token each. Row `b` writes
  its key/value at `pos[b]` of its own cache slot and attends to positions `0..pos[b]`, so rows of
  different lengths share one batch instead of padding the prompts. Everything between the
  matmuls (norms, RoPE, cache writes, attention, activation) runs in the C kernels of `native.py`
  where they could be built (~1.3x faster decode steps at qwen2-4m's shape); otherwise in PyTorch
  (`_attend`, `decode_attention`, `_prefill_attend`), which is also what the kernels are checked
  against.

The cache is preallocated by the engine: `k, v: [L, S, H_kv, T_max, D]` (S row slots). Head-major
rows make `cache[l, :B, :, :T]` a strided view that batched matmul reads without a copy.

Grouped-query attention never repeats keys: queries are viewed as `[B, H_kv, G, D]` (G query heads
per key head) and multiplied against `[B, H_kv, T, D]` directly.

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
configuration this file does not reproduce exactly (sliding windows, dynamic RoPE), makes
`lean_from_hf` return a reason string and the engine falls back to the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1lab.rollout import native

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
    """Weights of a supported decoder, laid out for `prefill`/`decode_step`, in one dtype."""

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


# --------------------------------------------------------------------------- building blocks


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ w.T + b in the weight's dtype (x is cast to it; the output is in it too);
    w is [out, in], or a oneDNN-packed copy of it (see `pack_weights`)."""
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`_mm` with the output in x's dtype: the PyTorch paths keep every activation in fp32."""
    y = _mm(x, w, b)
    return y if y.dtype == x.dtype else y.to(x.dtype)


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


def _norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    if b is not None:
        return F.layer_norm(x, x.shape[-1:], w, b, eps)
    return F.rms_norm(x, x.shape[-1:], w, eps)


def _mlp(lm: LeanModel, w: LeanLayer, h: torch.Tensor) -> torch.Tensor:
    u = _linear(h, w.up_w, w.up_b)  # [N, F] or [N, 2F]
    if lm.act == "swiglu":
        gate, up = u.chunk(2, dim=-1)  # [N, F] each
        u = F.silu(gate).mul_(up)  # [N, F]
    else:
        u = F.gelu(u, approximate="tanh" if lm.act == "gelu_tanh" else "none")  # [N, F]
    return _linear(u, w.down_w, w.down_b)  # [N, d]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's halves (HF's rotate_half convention); x [N, heads, D], cos/sin [N, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)  # [N, heads, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [N, heads, D]


def _rotation(lm: LeanModel, pos: torch.Tensor):
    """cos, sin [N, 1, D/2] for positions pos [N] (None without RoPE); computed once per forward."""
    if lm.cos is None:
        return None
    return lm.cos[pos][:, None], lm.sin[pos][:, None]


def _embed(lm: LeanModel, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    x = F.embedding(tokens, lm.embed)  # [N, d]
    if lm.pos_embed is not None:
        x = x + lm.pos_embed[pos]  # [N, d]
    return x


def _logits(lm: LeanModel, x: torch.Tensor) -> torch.Tensor:
    x = _norm(x, lm.final_w, lm.final_b, lm.eps)  # [B, d]
    return _linear(x, lm.lm_head)  # [B, V] fp32


# --------------------------------------------------------------------------- the two forwards


def prefill(lm: LeanModel, tokens: torch.Tensor, seq_lens: list[int], fused: bool = True):
    """Forward packed prompts (positions restart at 0 for each).

    tokens [N] holds the prompts back to back, N = sum(seq_lens). Returns the logits at each prompt's
    last token [P, V] (fp32) and, per layer, keys and values [N, H_kv, D] for the engine's cache.
    With `fused` and the C kernels available, the work between the matmuls runs there, as in
    `decode_step` (attention by `native.prefill_attend`); otherwise in PyTorch.
    """
    pos = torch.cat([torch.arange(t) for t in seq_lens])  # [N]
    ensure_rope(lm, max(seq_lens))
    x = _embed(lm, tokens, pos)  # [N, d]
    ends = torch.tensor(seq_lens).cumsum(0) - 1  # [P]
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if fused and native.available():

        def attention(i: int, w: LeanLayer, qkv: torch.Tensor) -> torch.Tensor:
            out, k, v = native.prefill_attend(
                qkv, lm.cos, lm.sin, pos, lm.n_heads, lm.n_kv_heads, w.scale, lm.mm_dtype
            )  # [N, H * D], [N, H_kv, D], [N, H_kv, D]
            kv.append((k, v))
            return out

        h = _layers_native(lm, x, attention)  # [N, d], the final norm of x
        return _mm(h[ends], lm.lm_head).float(), kv
    rot = _rotation(lm, pos)
    for w in lm.layers:
        qkv = _linear(_norm(x, w.norm1_w, w.norm1_b, lm.eps), w.qkv_w, w.qkv_b)  # [N, (H + 2*H_kv) * D]
        out, k, v = _prefill_attend(qkv, rot, seq_lens, lm.n_heads, lm.n_kv_heads, w.scale)
        kv.append((k, v))
        x = x + _linear(out, w.o_w, w.o_b)  # [N, d]
        x = x + _mlp(lm, w, _norm(x, w.norm2_w, w.norm2_b, lm.eps))  # [N, d]
    return _logits(lm, x[ends]), kv


def _prefill_attend(qkv, rot, seq_lens: list[int], n_heads: int, n_kv_heads: int, scale: float):
    """RoPE and causal attention of packed prompts in PyTorch (`native.prefill_attend` in C).

    qkv [N, (H + 2 H_kv) * D], the fused projection; rot from `_rotation(lm, pos)` or None. Returns
    the attention output [N, H * D] and the rotated keys and the values [N, H_kv, D] (the cache's).
    """
    n = qkv.shape[0]
    qkv = qkv.view(n, n_heads + 2 * n_kv_heads, -1)  # [N, H + 2*H_kv, D]
    qk = qkv[:, : n_heads + n_kv_heads]  # [N, H + H_kv, D]
    if rot is not None:
        # q and k heads are adjacent in the fused projection: one rotation covers both.
        qk = _rope(qk, *rot)
    q, k, v = qk[:, :n_heads], qk[:, n_heads:], qkv[:, n_heads + n_kv_heads :]
    return _prefill_attention(q, k, v, seq_lens, scale).reshape(n, -1), k, v


def _prefill_attention(q, k, v, seq_lens: list[int], scale: float) -> torch.Tensor:
    """Causal attention within each packed prompt: q [N, H, D], k/v [N, H_kv, D] -> [N, H, D].

    Prompts are few and long, so a loop costs little and wastes nothing on padding or on a
    block-diagonal mask of size N^2 (`native.prefill_attend` is the C version).
    """
    out = torch.empty_like(q)  # [N, H, D]
    start = 0
    for t in seq_lens:
        sl = slice(start, start + t)
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1)[None],  # [1, H, t, D]
            k[sl].transpose(0, 1)[None],  # [1, H_kv, t, D]
            v[sl].transpose(0, 1)[None],  # [1, H_kv, t, D]
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )  # [1, H, t, D]
        out[sl] = o[0].transpose(0, 1)  # [t, H, D]
        start += t
    return out


def _length_mask(lens: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, T]: row b sees its keys 0..lens[b]-1."""
    allowed = torch.arange(t)[None, :] < lens[:, None]  # [B, T]
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)[:, None, None]  # [B, 1, 1, T]


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row against its cached keys: q [B, H_kv, G, D], keys/vals [B, H_kv, T, D].

    Two batched matmuls with the G query heads of a key head as the rows, so GQA needs no repeated
    keys. Measured against `F.scaled_dot_product_attention(..., enable_gqa=True)` for head dim 64:
    this is as fast or faster at decode shapes (benchmarks/rollout_vs_hf.py, ablation `attention`).
    """
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).add_(mask)  # [B, H_kv, G, T]
    probs = torch.softmax(scores, dim=-1)  # [B, H_kv, G, T]
    return torch.matmul(probs, vals)  # [B, H_kv, G, D]


def _attend(qkv, rot, pos, k_cache, v_cache, n_heads: int, n_kv_heads: int, scale: float, mask=None):
    """RoPE, cache write and attention of one new token per row, in PyTorch (`native.attend` in C).

    qkv [B, (H + 2 H_kv) * D]; rot from `_rotation(lm, pos)` or None; pos [B]; k_cache/v_cache
    [S, H_kv, T_max, D], one layer's cache, written at [b, :, pos[b]]; mask from `_length_mask` for
    `pos + 1` (built here if not given). Returns [B, H * D].
    """
    b, dh = qkv.shape[0], k_cache.shape[-1]
    qkv = qkv.view(b, n_heads + 2 * n_kv_heads, dh)  # [B, H + 2*H_kv, D]
    # q and k heads are adjacent in the fused projection: one rotation covers both.
    qk = qkv[:, : n_heads + n_kv_heads]  # [B, H + H_kv, D]
    if rot is not None:
        qk = _rope(qk, *rot)
    rows = torch.arange(b)
    k_cache[rows, :, pos] = qk[:, n_heads:]  # [B, H_kv, D] into each row's own position
    v_cache[rows, :, pos] = qkv[:, n_heads + n_kv_heads :]
    if mask is None:
        mask = _length_mask(pos + 1, int(pos.max()) + 1, qkv.dtype)
    n_ctx = mask.shape[-1]
    q = qk[:, :n_heads].reshape(b, n_kv_heads, n_heads // n_kv_heads, dh)  # [B, H_kv, G, D]
    att = decode_attention(q, k_cache[:b, :, :n_ctx], v_cache[:b, :, :n_ctx], mask, scale)
    return att.reshape(b, n_heads * dh)  # [B, H * D]


def decode_step(
    lm: LeanModel,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    n_ctx: int,
    fused: bool = True,
) -> torch.Tensor:
    """One token for each of the first B cache rows; returns logits [B, V] (fp32).

    k_cache, v_cache [L, S, H_kv, T_max, D]; tokens [B] are the rows' last tokens, pos [B] their
    positions (= tokens already cached); n_ctx = max(pos) + 1 bounds the attention span.
    With `fused` and the C kernels available, everything between the matmuls runs there; otherwise
    in PyTorch. The two agree to float rounding (tests/unit/test_native.py).
    """
    if fused and native.available():
        return _decode_step_native(lm, k_cache, v_cache, tokens, pos)
    x = _embed(lm, tokens, pos)  # [B, d]
    rot = _rotation(lm, pos)
    mask = _length_mask(pos + 1, n_ctx, lm.dtype)  # [B, 1, 1, T], shared by the layers
    for i, w in enumerate(lm.layers):
        qkv = _linear(_norm(x, w.norm1_w, w.norm1_b, lm.eps), w.qkv_w, w.qkv_b)  # [B, (H + 2*H_kv) * D]
        att = _attend(qkv, rot, pos, k_cache[i], v_cache[i], lm.n_heads, lm.n_kv_heads, w.scale, mask)
        x = x + _linear(att, w.o_w, w.o_b)  # [B, d]
        x = x + _mlp(lm, w, _norm(x, w.norm2_w, w.norm2_b, lm.eps))  # [B, d]
    return _logits(lm, x)


def _decode_step_native(lm: LeanModel, k_cache, v_cache, tokens, pos) -> torch.Tensor:
    """`decode_step` with the C kernels: per layer three matmuls' worth of oneDNN and four C calls."""

    def attention(i: int, w: LeanLayer, qkv: torch.Tensor) -> torch.Tensor:
        return native.attend(
            qkv, lm.cos, lm.sin, pos, k_cache[i], v_cache[i], lm.n_heads, lm.n_kv_heads, w.scale, lm.mm_dtype
        )  # [B, H * D]

    h = _layers_native(lm, _embed(lm, tokens, pos), attention)  # [B, d], the final norm of x
    return _mm(h, lm.lm_head).float()  # [B, V]


def _layers_native(lm: LeanModel, x: torch.Tensor, attention) -> torch.Tensor:
    """Every layer on rows x [N, d] with the C kernels between the matmuls; returns the final norm of x.

    x is the residual stream (fp32), updated in place, so it must be a fresh tensor. The norms,
    attention and the cache are fp32; every matmul reads and writes `lm.mm_dtype`, and the C calls
    take its output and write its input in that dtype. `attention(i, layer, qkv)` returns layer i's
    attention output [N, H * D] (decode: one new token per row over the cache; prefill: causal
    within each packed prompt).
    """
    mm = lm.mm_dtype
    first = lm.layers[0]
    h = native.add_norm(x, None, first.norm1_w, first.norm1_b, lm.eps, mm)  # [N, d]
    for i, w in enumerate(lm.layers):
        att = attention(i, w, _mm(h, w.qkv_w, w.qkv_b))  # [N, H * D]
        h = native.add_norm(x, _mm(att, w.o_w, w.o_b), w.norm2_w, w.norm2_b, lm.eps, mm)  # x += attn out
        u = _mm(h, w.up_w, w.up_b)  # [N, F] or [N, 2F]
        if lm.act == "swiglu":
            u = native.swiglu(u, mm)  # [N, F]
        elif lm.act == "gelu_tanh":
            u = native.gelu_tanh_(u)
        else:
            u = F.gelu(u)
        nxt = lm.layers[i + 1] if i + 1 < lm.n_layers else None
        norm_w, norm_b = (nxt.norm1_w, nxt.norm1_b) if nxt else (lm.final_w, lm.final_b)
        h = native.add_norm(x, _mm(u, w.down_w, w.down_b), norm_w, norm_b, lm.eps, mm)  # x += MLP out
    return h
