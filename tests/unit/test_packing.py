"""Packed training forwards give the log-probs, entropies and gradients of right-padded ones."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from r1lab.modeling import build_char_tokenizer, build_model, fused, packing, token_logprobs
from r1lab.modeling.packing import pack_micro_batches, packed_token_logprobs, packing_supported

TOK = build_char_tokenizer()


def ragged(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 120) for _ in range(rng.randint(2, 30))] for _ in range(n)]


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # [B, L]
    attn = torch.zeros_like(ids)  # [B, L]
    for b, s in enumerate(seqs):
        ids[b, : len(s)], attn[b, : len(s)] = torch.tensor(s), 1
    return ids, attn


@pytest.mark.parametrize("preset", ["gpt2-1m", "qwen2-4m"])
@pytest.mark.parametrize("math_width", [packing.MATH_ATTENTION_MAX_WIDTH, 0])  # math kernel, then flash
def test_packed_logprobs_and_gradients_equal_the_padded_ones(preset, math_width, monkeypatch):
    monkeypatch.setattr(packing, "MATH_ATTENTION_MAX_WIDTH", math_width)
    model = build_model(preset, TOK, seed=0)
    fused.disable(model)  # HF's own forward, packed (r1lab's: tests/unit/test_fused.py)
    seqs = ragged(11, seed=preset == "gpt2-1m")
    weights = torch.randn(len(seqs), max(map(len, seqs)) - 1)  # [B, L-1] a loss touching every position

    def run(fn):
        model.zero_grad()
        logp, entropy = fn()
        (logp * weights).sum().backward()
        return logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]

    a = run(lambda: token_logprobs(model, *padded(seqs)))
    b = run(lambda: packed_token_logprobs(model, seqs, row_len=40))
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=1e-5)
    for ga, gb in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)
    # not vacuous: several sequences did share rows
    assert len(pack_micro_batches([len(s) for s in seqs], range(len(seqs)), 40, 40)) < len(seqs)
    assert packing_supported(model)


def test_a_sequence_longer_than_the_row_is_refused():
    model = build_model("gpt2-1m", TOK, seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        packed_token_logprobs(model, [[5] * 12], row_len=8)


class MaskingWrapper(nn.Module):
    """A causal LM that always passes a full attention mask, so packed sequences see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, **kw):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)


def test_a_model_that_lets_packed_sequences_mix_is_detected():
    inner = build_model("gpt2-1m", TOK, seed=0)
    assert packing_supported(inner) is True
    wrapped = MaskingWrapper(inner).train()
    assert packing_supported(wrapped) is False
    assert wrapped.training  # the probe restored the mode it found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_on_cuda_equals_padding(attn):
    """The GPU recipes train packed by default: the probe and the values must hold on CUDA too."""
    model = build_model("qwen2-4m", TOK, seed=0).to("cuda")
    model.config._attn_implementation = attn
    seqs = ragged(9, seed=3)
    assert packing_supported(model)
    ids, attn_mask = (t.cuda() for t in padded(seqs))
    a = token_logprobs(model, ids, attn_mask)[0]
    b = packed_token_logprobs(model, seqs, row_len=40)[0]
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
