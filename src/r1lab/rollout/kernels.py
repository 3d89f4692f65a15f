"""The lean forward of the CPU engine: GPT-2 and Qwen2/Llama decoders as small pure functions.

Hugging Face modules are written for training and for every model ever published; on a 2-core CPU
their per-layer Python (cache objects, mask builders, dispatch) costs as much as the arithmetic of a
tiny model. Here the weights are read from the HF module once (`lean.lean_from_hf`: q/k/v fused into
one matrix, GPT-2's Conv1D weights transposed, gate and up fused) and the forward is a handful of
torch calls per layer:

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

The weights (`LeanModel`, read from the HF module by `lean.lean_from_hf`, in which dtype and
layout) are `lean.py`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1lab.rollout import native
from r1lab.rollout.lean import LeanLayer, LeanModel, ensure_rope

# --------------------------------------------------------------------------- building blocks


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ w.T + b in the weight's dtype (x is cast to it; the output is in it too);
    w is [out, in], or a oneDNN-packed copy of it (see `lean.pack_weights`)."""
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`_mm` with the output in x's dtype: the PyTorch paths keep every activation in fp32."""
    y = _mm(x, w, b)
    return y if y.dtype == x.dtype else y.to(x.dtype)


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
