"""r1lab's own training forward of Qwen2, Llama and GPT-2 models on CPU, for packed sequences.

Hugging Face's forward is general; on a CPU its elementwise code costs as much as a third of a
training step at these sizes (benchmarks/README.md: RMSNorm, RoPE and SwiGLU as many small kernels,
autocast casting the same input once per projection, the matmuls run over row padding). This forward
computes the same function from the same parameters (gradients land in the model's own `.grad`):

* the sequences of a micro-batch are one flat stream of tokens `[T, d]`, with no padding: every
  matmul and elementwise op runs on real tokens only;
* q|k|v and gate|up are one matmul each (GPT-2's are one already), each norm written by its kernel
  in the matmul's dtype; every matmul runs on oneDNN-packed copies of its weight (`onednn.packed_linear`:
  cast, concatenated and packed once per optimiser step, for the forward and the input gradient);
* RMSNorm, LayerNorm, RoPE, SwiGLU and GELU run as the C kernels of `train_kernels` (one pass
  forward, one back);
* only attention goes back to rows: RoPE writes q, k and v into rows of packed sequences (as
  `packing.packed_tensors` lays them out), and attention runs there under the block-diagonal causal
  mask, as two batched matmuls per layer with the query heads of a key head stacked (SDPA for rows
  over `MATH_ATTENTION_MAX_WIDTH` tokens).

Numerics: fp32 agrees with HF to float rounding; under bf16 autocast the matmuls, attention and the
residual stream have HF's dtypes, while RoPE and the activations round once (from fp32) where HF's
bf16 arithmetic rounds at every op. `supported(model)` checks the architecture and compares the
logits with HF's once per model; anything else (other architectures, LoRA wrappers, sliding windows,
RoPE scaling, dropout while training, GPUs, no C compiler) keeps HF's forward. Tests:
tests/unit/test_fused.py (logits and gradients against HF in fp32 and bf16, the GRPO update on both
paths, the kernels against PyTorch).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from r1lab.modeling import onednn, train_kernels

LLAMA_LIKE = ("qwen2", "llama")  # RMSNorm, RoPE, SwiGLU, grouped-query attention
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh GELU
_LINEARS = (nn.Linear, onednn.OneDNNLinear)  # exactly these classes: a subclass may compute more
_CONV1DS = (Conv1D, onednn.OneDNNConv1D)
#: Rows up to this many tokens run attention as batched matmuls: `_attention` here, SDPA's math
#: kernel in HF's forward (`packing.attention_backend`). Their scores are [rows, heads, W, W].
MATH_ATTENTION_MAX_WIDTH = 512


def _family(model) -> str | None:
    """ "llama" (Qwen2, Llama) or "gpt2" when the model has the structure this forward reproduces:
    the config's options, the exact module classes (a LoRA layer or any other replacement is not
    one), every parameter fp32 on the CPU."""
    cfg = model.config
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return None
    if type(model.lm_head) not in _LINEARS or model.lm_head.bias is not None:
        return None
    if cfg.model_type in LLAMA_LIKE:
        return "llama" if _llama_ok(model) else None
    if cfg.model_type == "gpt2":
        return "gpt2" if _gpt2_ok(model) else None
    return None


def _named(module, *suffixes: str) -> bool:
    return type(module).__name__.endswith(suffixes)


def _llama_ok(model) -> bool:
    cfg, m = model.config, model.model
    rope = getattr(cfg, "rope_parameters", None) or {}
    H = cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    ok = (
        cfg.hidden_act == "silu"
        and rope.get("rope_type", "default") == "default"
        and float(getattr(m.rotary_emb, "attention_scaling", 1.0)) == 1.0
        and 2 * m.rotary_emb.inv_freq.numel() == D  # every dimension rotated (no partial rotary)
        and not getattr(cfg, "use_sliding_window", False)
        and not getattr(cfg, "mlp_bias", False)
        and type(m.embed_tokens) is nn.Embedding
        and _named(m.norm, "RMSNorm")
    )
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        ok = ok and _named(layer, "DecoderLayer") and _named(a, "Attention") and _named(mlp, "MLP")
        ok = ok and all(type(x) in _LINEARS for x in linears) and a.o_proj.bias is None
        ok = ok and all(_named(x, "RMSNorm") and hasattr(x, "variance_epsilon") for x in norms)
    return bool(ok)


def _gpt2_ok(model) -> bool:
    cfg, t = model.config, model.transformer
    ok = (
        cfg.activation_function in GPT2_ACTIVATIONS
        and not getattr(cfg, "add_cross_attention", False)
        and not getattr(cfg, "reorder_and_upcast_attn", False)
        and type(t.ln_f) is nn.LayerNorm
        and type(t.wte) is nn.Embedding
        and type(t.wpe) is nn.Embedding
    )
    for blk in t.h:
        convs = (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)
        ok = (
            ok
            and _named(blk, "GPT2Block")
            and _named(blk.attn, "GPT2Attention")
            and _named(blk.mlp, "GPT2MLP")
        )
        ok = ok and all(type(c) in _CONV1DS and c.bias is not None for c in convs)
        ok = ok and type(blk.ln_1) is nn.LayerNorm and type(blk.ln_2) is nn.LayerNorm
        ok = ok and isinstance(blk.attn.scaling, float)
    return bool(ok)


def supported(model) -> bool:
    """Whether `fused_logits` may replace this model's forward here and now.

    Checked on every call (cheap): the `R1LAB_FUSED=0` switch and `disable(model)`, autocast off or
    bf16, no dropout that would be active, the structure (`_family`: classes, options, every
    parameter fp32 on the CPU) and the C kernels. Once per structure (the check is cached on the
    model with a signature of its module classes, so a model changed in place is checked again), the
    logits are compared with HF's."""
    if os.environ.get("R1LAB_FUSED", "1") == "0" or getattr(model, "_r1lab_fused_off", False):
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    try:
        if _dropout_active(model) or _family(model) is None or onednn._mkldnn() is None:
            return False
        if not train_kernels.available():
            return False
    except AttributeError:  # not a Hugging Face causal LM of these families
        return False
    signature = tuple(type(m) for m in model.modules())
    checked = getattr(model, "_r1lab_fused_checked", None)
    if checked is None or checked[0] != signature:
        checked = (signature, _agrees_with_hf(model))
        model._r1lab_fused_checked = checked
    return checked[1]


def disable(model) -> None:
    """Keep HF's forward for this model (A/B comparisons, tests)."""
    model._r1lab_fused_off = True


def _dropout_active(model) -> bool:
    """Whether a forward in the model's current mode would drop anything (this one never does)."""
    if not model.training:
        return False
    names = ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")
    if any(float(getattr(model.config, k, 0.0) or 0.0) > 0 for k in names):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in model.modules())


def _agrees_with_hf(model) -> bool:
    """Two packed sequences (fp32, no grad, eval mode): fused logits against HF's on the same rows."""
    vocab = model.get_input_embeddings().num_embeddings
    rows = [[[(7 * k + 3) % vocab for k in range(6)], [(5 * k + 1) % vocab for k in range(4)]]]
    modes = [(m, m.training) for m in model.modules()]
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
        for m, mode in modes:  # each module's own mode back, not only the top one's
            m.training = mode


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


def _embed(ids: torch.Tensor, table: torch.nn.Embedding) -> torch.Tensor:
    """The table's rows (its padding row, if any, gets no gradient, as in nn.Embedding)."""
    return F.embedding(ids, table.weight, padding_idx=table.padding_idx)


def _conv1d(x: torch.Tensor, conv) -> torch.Tensor:
    """GPT-2's Conv1D (weight [in, out]): a linear layer of weight.T."""
    return onednn.packed_linear(x, conv, "w", [conv.weight], [conv.bias], transposed=True)


class _Rows:
    """A micro-batch's layout: flat ids and positions [T], each token's slot in the [R * W]
    attention rows, and the additive block-diagonal causal mask [R, 1, W, W] in the scores' dtype."""

    def __init__(self, rows: list[list[list[int]]], dtype: torch.dtype):
        self.ids, self.pos, self.slot, allowed, self.W = _layout(rows)
        self.R = len(rows)
        # made once for every layer (SDPA converts a bool mask on each call)
        self.mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))

    def attend(self, qkv, tables, H: int, Hkv: int, D: int, scale: float) -> torch.Tensor:
        """Self-attention of the fused projection qkv [T, (H + 2 Hkv) D] (RoPE from `tables` (cos, sin)
        unless None): [T, H D]."""
        R, W = self.R, self.W
        cos, sin = tables if tables is not None else (None, None)
        rows = train_kernels.rope_scatter(qkv, cos, sin, self.pos, self.slot, R * W, H, Hkv, D)  # [R W, C]
        r4 = rows.view(R, W, H + 2 * Hkv, D)
        q, k, v = (r4[:, :, i:j].transpose(1, 2) for i, j in ((0, H), (H, H + Hkv), (H + Hkv, H + 2 * Hkv)))
        o = _attention(q, k, v, self.mask, scale)  # [R, H, W, D]
        return o.transpose(1, 2).reshape(R * W, H * D).index_select(0, self.slot)  # [T, H D]


def fused_logits(model, rows: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `[T, V]` of packed rows of sequences (`rows[r]` = the token lists laid end to end in row
    r), over the rows' tokens concatenated without padding, and those token ids `[T]`.

    Under bf16 autocast the matmuls and attention run in bf16 (logits bf16), as HF's forward would.
    Call only where `supported(model)`."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused_logits: autocast to {dtype} is not supported (bf16 or none)")
    if not any(s for row in rows for s in row):
        raise ValueError("fused_logits: no tokens to score")
    layout = _Rows(rows, dtype)
    x = (
        _gpt2_body(model, layout, dtype)
        if model.config.model_type == "gpt2"
        else _llama_body(model, layout, dtype)
    )
    return onednn.packed_linear(x, model.lm_head, "w", [model.lm_head.weight]), layout.ids  # [T, V], [T]


def _llama_body(model, rows: _Rows, dtype: torch.dtype) -> torch.Tensor:
    """Qwen2 / Llama up to the final norm: [T, d] in `dtype`."""
    cfg, m = model.config, model.model
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    tables = _rope_tables(model, int(rows.pos.max()) + 1)
    h = _embed(rows.ids, m.embed_tokens)  # [T, d] fp32: the residual stream
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        x = train_kernels.rms_norm(h, n1.weight, n1.variance_epsilon, dtype)  # [T, d]
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        biases = [p.bias for p in qkv] if a.q_proj.bias is not None else []
        qkv = onednn.packed_linear(x, a, "qkv", [p.weight for p in qkv], biases)  # [T, (H + 2 Hkv) D]
        o = rows.attend(qkv, tables, H, Hkv, D, a.scaling)  # [T, H D]
        h = h + onednn.packed_linear(o, a, "o", [a.o_proj.weight])
        x = train_kernels.rms_norm(h, n2.weight, n2.variance_epsilon, dtype)
        gu = onednn.packed_linear(x, mlp, "gate_up", [mlp.gate_proj.weight, mlp.up_proj.weight])  # [T, 2F]
        h = h + onednn.packed_linear(train_kernels.swiglu(gu), mlp, "down", [mlp.down_proj.weight])
    return train_kernels.rms_norm(h, m.norm.weight, m.norm.variance_epsilon, dtype)


def _gpt2_body(model, rows: _Rows, dtype: torch.dtype) -> torch.Tensor:
    """GPT-2 up to the final LayerNorm (its Conv1D weights are [in, out]: linear layers of w.T)."""
    t, H = model.transformer, model.config.n_head
    D = model.config.n_embd // H
    h = _embed(rows.ids, t.wte) + _embed(rows.pos, t.wpe)  # [T, d] fp32
    for blk in t.h:
        a, mlp = blk.attn, blk.mlp
        x = train_kernels.layer_norm(h, blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps, dtype)
        o = rows.attend(_conv1d(x, a.c_attn), None, H, H, D, a.scaling)
        h = h + _conv1d(o, a.c_proj)
        x = train_kernels.layer_norm(h, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps, dtype)
        h = h + _conv1d(train_kernels.gelu_tanh(_conv1d(x, mlp.c_fc)), mlp.c_proj)  # GELU on [T, F]
    return train_kernels.layer_norm(h, t.ln_f.weight, t.ln_f.bias, t.ln_f.eps, dtype)
