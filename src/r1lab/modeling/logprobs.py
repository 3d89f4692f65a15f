"""Per-token log-probabilities and entropies of a causal LM, and the FLOP count used for cost.

`token_logprobs(model, input_ids, attention_mask, start)` runs one forward pass and returns, for every
target token `input_ids[:, start:]`, its log-probability under the model given all tokens before it
(the quantity GRPO's ratio and KL are built from) and the entropy of the model's next-token
distribution at that position (a health metric: entropy collapse shows up here first).

Memory: the model's own `[B, T, V]` logits are the one large tensor. `logits_to_keep` asks the model
for only the positions that predict targets (a batch of prompts of width P needs `T - P + 1`, not
`T`), and the log-softmax is computed in blocks of at most `BLOCK_ELEMENTS` logits from `logsumexp`
and a gather, with a hand-written backward that writes the gradient block by block: no full
log-softmax, float32 upcast of bf16 logits, float64 copy or sliced copy of the logits is ever made.
Measured on `[8, 512, 32000]` logits, forward + backward: 1507 MiB of extra peak memory for the naive
`log_softmax` + gather (fp32 or bf16 logits) against 572 MiB (fp32) and 401 MiB (bf16) here, of which
the logits' own gradient is 500 / 250 MiB.

Padding: batches may be left-padded (prompts) and right-padded (completions). Position ids are
derived from the attention mask so a left-padded row gets the same positions, and hence the same
log-probs, as the unpadded sequence; samplers should use `position_ids_from_mask` the same way.
Padded target positions come back as 0.0 (never NaN), to be masked by the caller.

Cost (`flops_per_token`): forward FLOPs per token = 2 * N_matmul + 4 * n_layer * context * d_attn,
where N_matmul counts every weight a token is multiplied by (all parameters except the input and
position embedding tables, plus the output projection even when it is tied to the input embedding)
and the second term is attention's QK^T and AV products over `context` earlier tokens (PaLM,
appendix B; Kaplan et al. 2020 count only QK^T). Training costs 3x forward (backward = 2x forward):
6 * N_matmul + 12 * n_layer * context * d_attn, the formula PaLM and nanochat use for MFU.
"""

from __future__ import annotations

import torch
from torch import nn

#: Logit elements processed at once: bounds each float32 temporary to 64 MiB whatever the vocabulary.
BLOCK_ELEMENTS = 1 << 24


def _rows(vocab: int) -> int:
    """Positions per block for a vocabulary of `vocab` tokens."""
    return max(1, BLOCK_ELEMENTS // vocab)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting only real tokens: left padding does not shift positions.

    >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]


def _upcast(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """A block of logits in at least float32, divided by the temperature: `[n, V]`."""
    x = block.to(torch.promote_types(block.dtype, torch.float32))  # [n, V]; no copy if already fp32/fp64
    return x / temperature if temperature != 1.0 else x  # [n, V]


class _GatherLogSoftmax(torch.autograd.Function):
    """log softmax(x / t)[id] and the entropy, block by block, with a hand-written blockwise backward.

    Takes logits `[R, K, V]` and ids `[R, K']` with K' <= K: position k < K' is scored against
    `ids[r, k]` and the last K - K' positions are ignored. That lets `token_logprobs` pass the model's
    logits whole: slicing off the last position of a batch and flattening it would copy them.

    Autograd through slices, `logsumexp` and `gather` would keep an upcast copy of every block and
    build one full-size zero-padded gradient per block; here the backward writes
    d logp / dx = (onehot(id) - softmax(x / t)) / t straight into a single gradient tensor of the
    logits' dtype, so the only full-size extra is that gradient.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature: float, with_entropy: bool):  # [R, K, V], [R, K']
        R, K = ids.shape
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.empty(R, K, dtype=out_dtype, device=logits.device)  # [R, K']
        entropy = torch.zeros(R, K, dtype=out_dtype, device=logits.device)  # [R, K']
        lse = torch.empty(R, K, dtype=out_dtype, device=logits.device)  # [R, K']
        step = _rows(logits.shape[-1])
        for r in range(R):
            for s in range(0, K, step):
                e = min(s + step, K)
                x = _upcast(logits[r, s:e], temperature)  # [n, V], a contiguous block
                block_lse = torch.logsumexp(x, dim=-1)  # [n]
                lse[r, s:e] = block_lse
                logp[r, s:e] = x.gather(-1, ids[r, s:e, None]).squeeze(-1) - block_lse  # [n]
                if with_entropy:
                    p = (x - block_lse[:, None]).exp_()  # [n, V]
                    # H = -sum p log p = lse - sum p x, since log p = x - lse and sum p = 1.
                    entropy[r, s:e] = block_lse - p.mul_(x).sum(-1)  # [n]
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):  # [R, K'], ignored (entropy is a metric)
        logits, ids, lse = ctx.saved_tensors
        t = ctx.temperature
        R, K = ids.shape
        # [R, K, V]; positions past K' get no gradient, so only then must the tensor start zeroed
        grad = torch.zeros_like(logits) if K < logits.shape[1] else torch.empty_like(logits)
        step = _rows(logits.shape[-1])
        for r in range(R):
            for s in range(0, K, step):
                e = min(s + step, K)
                g = grad_logp[r, s:e, None].to(lse.dtype)  # [n, 1]
                block = _upcast(logits[r, s:e], t).sub(lse[r, s:e, None])  # [n, V]
                block.exp_().mul_(-g)  # -softmax * g
                block.scatter_add_(-1, ids[r, s:e, None], g)  # + onehot(id) * g
                grad[r, s:e] = block.div_(t) if t != 1.0 else block  # [n, V], cast to logits' dtype
        return grad, None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of `ids`, entropy of the distribution), float32 (float64 for float64 logits).

    `logits` is `[..., V]` in any float dtype, `ids` is `[...]`; both results have the shape of `ids`.
    The log-probs carry gradients; the entropy is a detached metric (zeros if `with_entropy=False`).
    """
    flat = logits.reshape(1, -1, logits.shape[-1])  # [1, N, V] (a view when contiguous)
    logp, entropy = _GatherLogSoftmax.apply(flat, ids.reshape(1, -1), float(temperature), with_entropy)
    return logp.reshape(ids.shape), entropy.reshape(ids.shape)  # [...] each


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`log_softmax(logits / temperature)[..., ids]`, without materialising the log-softmax.

    >>> logits = torch.tensor([[0.0, 0.0], [0.0, 1e4]])
    >>> selective_log_softmax(logits, torch.tensor([1, 0])).tolist()
    [-0.6931471824645996, -10000.0]
    """
    return logprobs_and_entropy(logits, ids, temperature, with_entropy=False)[0]


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int = 1,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the tokens `input_ids[:, start:]`, each `[B, T - start]`.

    Column j is about token `input_ids[:, start + j]`. With the default `start=1` that is every token
    but the first (`[B, T-1]`); with `start=P` for a batch whose prompts are left-padded to width P,
    it is exactly the completion tokens, and only their logits are computed. Positions where
    `attention_mask` is 0 are returned as 0.0. `temperature` divides the logits first, as samplers do.
    """
    B, T = input_ids.shape
    if not 1 <= start < T:
        raise ValueError(f"start must be in [1, {T - 1}] for sequences of length {T}, got {start}")
    n = T - start  # target tokens per row
    out = model(
        input_ids=input_ids,  # [B, T]
        attention_mask=attention_mask,  # [B, T]
        position_ids=position_ids_from_mask(attention_mask),  # [B, T]
        logits_to_keep=n + 1,  # positions start-1 .. T-1
        use_cache=False,
    )
    targets = input_ids[:, start:]  # [B, n]
    # out.logits is [B, n + 1, V]; its position j predicts targets[:, j] and the last one is unused
    logp, entropy = _GatherLogSoftmax.apply(out.logits, targets, float(temperature), True)  # [B, n] each
    pad = attention_mask[:, start:] == 0  # [B, n]
    return logp.masked_fill(pad, 0.0), entropy.masked_fill(pad, 0.0)


# --------------------------------------------------------------------------- cost accounting


def _embedding_params(model: nn.Module) -> set[int]:
    """ids of the parameters of embedding tables (token and learned position embeddings)."""
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (a tied output projection counted once).

    `exclude_embeddings` drops the token and position embedding tables (Kaplan's "non-embedding N").
    A tied output projection is that same table, so it is dropped too; an untied one is a matmul
    and stays. For FLOPs use `flops_per_token`, which always counts the output projection.
    """
    skip = _embedding_params(model) if exclude_embeddings else set()
    seen: dict[int, int] = {}
    for p in model.parameters():  # parameters() yields each shared tensor once
        if id(p) not in skip:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def matmul_params(model: nn.Module) -> int:
    """Parameters each token is multiplied by: non-embedding ones plus the output projection."""
    n = count_params(model, exclude_embeddings=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) in _embedding_params(model):
        n += head.weight.numel()  # tied: the de-embedding matmul still happens
    return n


def _as_model(model_or_config) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no init cost
        return AutoModelForCausalLM.from_config(model_or_config)


def flops_per_token(model_or_config, context: int = 0, train: bool = False) -> float:
    """FLOPs per token: forward, or forward + backward with `train=True` (see the module docstring).

    `context` is how many tokens each token attends to: the sequence length for training and
    prefill (an upper bound under the causal mask; PaLM's convention), the current length when
    decoding with a KV cache. Accepts a model or a transformers config (built on the meta device).
    """
    model = _as_model(model_or_config)
    cfg = model.config.get_text_config()
    n_layer = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    forward = 2.0 * matmul_params(model) + 4.0 * n_layer * context * d_attn
    return 3.0 * forward if train else forward
