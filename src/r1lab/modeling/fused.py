"""r1lab's own training forward of Llama-family models (Qwen2, Llama) on CPU, for packed sequences.

Hugging Face's forward is general; on a CPU its elementwise code costs as much as a third of a
training step at these sizes (benchmarks/README.md: RMSNorm, RoPE and SwiGLU as many small kernels,
autocast casting the same input once per projection, the matmuls run over row padding). This forward
computes the same function from the same parameters (gradients land in the model's own `.grad`):

* the sequences of a micro-batch are one flat stream of tokens `[T, d]`, with no padding: every
  matmul and elementwise op runs on real tokens only;
* q|k|v and gate|up are one matmul each (the weights concatenated, and cast to bf16 once under
  autocast), the input norm written by its kernel in the matmul's dtype;
* RMSNorm, RoPE and SwiGLU run as the C kernels of `train_kernels` (one pass forward, one back);
* only attention goes back to rows: RoPE writes q, k and v into rows of packed sequences (as
  `packing.packed_tensors` lays them out) and SDPA runs there under the block-diagonal causal mask.

Numerics: fp32 agrees with HF to float rounding; under bf16 autocast the matmuls, attention and the
residual stream have HF's dtypes, while RoPE and SwiGLU round once (from fp32) where HF's bf16
arithmetic rounds at every op. `supported(model)` checks the architecture and compares the logits
with HF's once per model; anything else (GPT-2, LoRA wrappers, sliding windows, RoPE scaling, dropout,
GPUs, no C compiler) keeps HF's forward. Tests: tests/unit/test_fused.py (logits and gradients
against HF in fp32 and bf16, the GRPO update on both paths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1lab.modeling import onednn, train_kernels

FAMILIES = ("qwen2", "llama")
#: Rows up to this many tokens run attention as batched matmuls: `_attention` here, SDPA's math
#: kernel in HF's forward (`packing.attention_backend`). Their scores are [rows, heads, W, W].
MATH_ATTENTION_MAX_WIDTH = 512


def _architecture_ok(model) -> bool:
    """The structure this forward reproduces, read from the config and the modules."""
    cfg = model.config
    try:
        rope = getattr(cfg, "rope_parameters", None) or {}
        m = model.model
        ok = (
            cfg.model_type in FAMILIES
            and cfg.hidden_act == "silu"
            and rope.get("rope_type", "default") == "default"
            and float(getattr(m.rotary_emb, "attention_scaling", 1.0)) == 1.0
            and not getattr(cfg, "use_sliding_window", False)
            and not (model.training and float(getattr(cfg, "attention_dropout", 0.0)) > 0)
            and not getattr(cfg, "mlp_bias", False)
            and next(model.parameters()).device.type == "cpu"
            and next(model.parameters()).dtype == torch.float32
            and m.embed_tokens.weight.dim() == 2
        )
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            ok = ok and all(x.weight.dim() == 2 for x in linears) and a.o_proj.bias is None
            ok = ok and all(x.weight.dim() == 1 and hasattr(x, "variance_epsilon") for x in norms)
        return bool(ok) and hasattr(m.norm, "variance_epsilon") and model.lm_head.weight.dim() == 2
    except AttributeError:
        return False


def supported(model) -> bool:
    """Whether `fused_logits` may replace this model's forward: the architecture matches, the C
    kernels are available and, once per model (cached on it), the logits agree with HF's."""
    cached = getattr(model, "_r1lab_fused_ok", None)
    if cached is not None:
        return cached
    ok = _architecture_ok(model) and train_kernels.available()
    if ok:
        ok = _agrees_with_hf(model)
    model._r1lab_fused_ok = ok
    return ok


def _agrees_with_hf(model) -> bool:
    """Two packed sequences (fp32, no grad, eval mode): fused logits against HF's on the same rows."""
    vocab = model.get_input_embeddings().num_embeddings
    rows = [[[(7 * k + 3) % vocab for k in range(6)], [(5 * k + 1) % vocab for k in range(4)]]]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            got, _ = fused_logits(model, rows)  # [10, V]
            ids = torch.tensor([rows[0][0] + rows[0][1]])
            pos = torch.tensor([list(range(6)) + list(range(4))])
            want = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        return bool(torch.allclose(got.float(), want.float(), atol=1e-4, rtol=1e-4))
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError):
        return False
    finally:
        model.train(was_training)


def _rope_tables(model, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, D/2] of positions 0..P-1, as HF's rotary embedding computes them (fp32)."""
    inv = model.model.rotary_emb.inv_freq.float()
    ang = torch.arange(P, dtype=torch.float32)[:, None] * inv  # [P, D/2]
    return ang.cos(), ang.sin()


def _layout(rows: list[list[list[int]]]):
    """Flat ids/positions [T], each token's slot in the [R * W] attention rows, and the mask."""
    W = max(sum(len(s) for s in row) for row in rows)
    ids, pos, slot = [], [], []
    seg = torch.arange(len(rows) * W).neg_().sub_(1).view(len(rows), W)  # padding: alone, < 0
    k = 0
    for r, row in enumerate(rows):
        t = r * W
        for s in row:
            ids += s
            pos += range(len(s))
            slot += range(t, t + len(s))
            seg.view(-1)[t : t + len(s)] = k
            k += 1
            t += len(s)
    causal = torch.ones(W, W, dtype=torch.bool).tril_()
    mask = (seg[:, :, None] == seg[:, None, :]).logical_and_(causal)[:, None]  # [R, 1, W, W]
    return torch.tensor(ids), torch.tensor(pos), torch.tensor(slot), mask, W


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x [T, in] @ w.T + b in `dtype` (bf16: the weights cast once; fp32: oneDNN where it wins)."""
    if dtype == torch.float32:
        if onednn.onednn_is_faster():
            return onednn._linear(x, w, b)
        return F.linear(x, w, b)
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


def _attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention of q [R, H, W, D] over k, v [R, Hkv, W, D] under the additive mask [R, 1, W, W].

    Rows up to `MATH_ATTENTION_MAX_WIDTH` tokens: the G = H / Hkv query heads that share a
    key head are one matrix ([R, Hkv, G W, D] @ [R, Hkv, D, W]), the softmax in fp32 as in HF's eager
    attention. Measured on 36 rows of 90 tokens (8 heads over 2, forward + backward, 2 threads):
    7.6 ms in bf16 against 23 ms for SDPA's math kernel, which repeats k and v per query head and
    re-derives its mask per call. Longer rows keep SDPA: the scores here are [R, H, W, W] in fp32."""
    R, H, W, D = q.shape
    Hkv = k.shape[1]
    if W > MATH_ATTENTION_MAX_WIDTH:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
    G = H // Hkv
    s = torch.matmul(q.reshape(R, Hkv, G * W, D), k.transpose(-1, -2)).mul_(scale)  # [R, Hkv, G W, W]
    s = s.view(R, Hkv, G, W, W) + mask[:, :, None]
    p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p.view(R, Hkv, G * W, W), v).view(R, H, W, D)


def _cat(*ps):
    ps = [p for p in ps if p is not None]
    return torch.cat(ps) if len(ps) > 1 else (ps[0] if ps else None)


def fused_logits(model, rows: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `[T, V]` of packed rows of sequences (`rows[r]` = the token lists laid end to end in row
    r), over the rows' tokens concatenated without padding, and those token ids `[T]`.

    Under bf16 autocast the matmuls and attention run in bf16 (logits bf16), as HF's forward would.
    Call only where `supported(model)`."""
    cfg, m = model.config, model.model
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    ids, pos, slot, allowed, W = _layout(rows)
    R = len(rows)
    # additive, in the scores' dtype, made once for every layer (a bool mask is converted per call)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))  # [R, 1, W, W]
    cos, sin = _rope_tables(model, int(pos.max()) + 1)
    h = F.embedding(ids, m.embed_tokens.weight)  # [T, d] fp32
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        n1 = layer.input_layernorm
        x = train_kernels.rms_norm(h, n1.weight, n1.variance_epsilon, dtype)  # [T, d]
        w_qkv = _cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
        b_qkv = _cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
        qkv = _linear(x, w_qkv, b_qkv, dtype)  # [T, (H + 2 Hkv) D]
        rows_qkv = train_kernels.rope_scatter(qkv, cos, sin, pos, slot, R * W, H, Hkv, D)  # [R W, C]
        r4 = rows_qkv.view(R, W, H + 2 * Hkv, D)
        q, k, v = (r4[:, :, i:j].transpose(1, 2) for i, j in ((0, H), (H, H + Hkv), (H + Hkv, H + 2 * Hkv)))
        o = _attention(q, k, v, mask, a.scaling)  # [R, H, W, D]
        o = o.transpose(1, 2).reshape(R * W, H * D).index_select(0, slot)  # [T, H D]
        h = h + _linear(o, a.o_proj.weight, None, dtype)  # fp32 residual stream
        n2 = layer.post_attention_layernorm
        x = train_kernels.rms_norm(h, n2.weight, n2.variance_epsilon, dtype)
        gu = _linear(x, _cat(mlp.gate_proj.weight, mlp.up_proj.weight), None, dtype)  # [T, 2F]
        h = h + _linear(train_kernels.swiglu(gu), mlp.down_proj.weight, None, dtype)
    x = train_kernels.rms_norm(h, m.norm.weight, m.norm.variance_epsilon, dtype)
    head = model.lm_head
    return _linear(x, head.weight, getattr(head, "bias", None), dtype), ids  # [T, V], [T]
