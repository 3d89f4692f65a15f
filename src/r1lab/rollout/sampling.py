"""Token sampling for a batch of rows that each carry their own temperature, top-p and random stream.

Randomness is counter-based: row r's noise for its t-th token is a hash of (row key, t, token id), so
a row's samples depend on its key only, never on which other rows share the batch, on the batch
order or on how many steps ran before it joined. Same key, same model, same prompt: same completion.
A categorical draw is the Gumbel-max trick, `argmax(logits / T + g)` with `g = -log(-log u)`, which
samples exactly softmax(logits / T); nucleus (top-p) filtering sets the logits outside the smallest
set of tokens whose probability reaches `top_p` to -inf first. Temperature 0 is argmax.

The returned log-prob is under the raw policy (temperature 1, no top-p): it is what the trainer
recomputes, so importance ratios start at exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1lab.rollout import native

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, C. Wellons) on int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32  # the product may wrap int64; its low 32 bits are still right
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """`_mix32` on one Python int (same arithmetic, no tensor)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def derive_key(seed: int, index: int) -> int:
    """Key of sample `index` of a call seeded with `seed` (any Python ints).

    >>> derive_key(7, 0) == derive_key(7, 0) != derive_key(7, 1)
    True
    """
    folded = (seed & _M32) ^ ((seed >> 32) & _M32)
    return _mix32_int(_mix32_int(folded) ^ ((index * _GOLDEN) & _M32))


def uniform(keys: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1) for each row and token id: keys [B], counters [B] (int64) -> [B, V] fp32."""
    row = _mix32(keys ^ _mix32((counters * _GOLDEN) & _M32))  # [B]
    col = _mix32(torch.arange(vocab, dtype=torch.int64) + 0x5BD1E995)  # [V]
    bits = _mix32(row[:, None] ^ col[None, :])  # [B, V]
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # [B, V], 24 random bits each


@dataclass
class RowParams:
    """Per-row sampling settings as tensors, rebuilt only when the batch changes."""

    temperature: torch.Tensor  # [B] fp32; 0 = greedy
    top_p: torch.Tensor  # [B] fp32
    keys: torch.Tensor  # [B] int64
    all_greedy: bool  # no row samples: skip the noise entirely
    any_top_p: bool  # some row filters: sort once per step

    @staticmethod
    def build(temperature: list[float], top_p: list[float], keys: list[int]) -> RowParams:
        return RowParams(
            temperature=torch.tensor(temperature, dtype=torch.float32),
            top_p=torch.tensor(top_p, dtype=torch.float32),
            keys=torch.tensor(keys, dtype=torch.int64),
            all_greedy=all(t == 0 for t in temperature),
            any_top_p=any(p < 1.0 and t > 0 for p, t in zip(top_p, temperature, strict=True)),
        )


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token falls outside the nucleus: probs [B, V], top_p [B] -> [B, V] bool.

    A token is kept while the mass strictly before it (in descending order) is below top_p, so the
    most likely token is always kept and `top_p -> 0` is greedy.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V] each
    before = sorted_p.cumsum(dim=-1) - sorted_p  # [B, V] mass ahead of each token
    # top_p = 1 keeps everything even when rounding makes the cumulative sum reach 1 early.
    limit = torch.where(top_p >= 1.0, torch.full_like(top_p, float("inf")), top_p)  # [B]
    drop_sorted = before >= limit[:, None]  # [B, V]
    return torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)  # [B, V] in vocab order


def sample(
    logits: torch.Tensor, rows: RowParams, counters: torch.Tensor, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits [B, V] fp32, counters [B] (tokens each row has drawn so far).

    Returns tokens [B] int64 and their log-probs under the raw policy [B] fp32. With `fused` and no
    top-p row, the draw runs in the C kernel of `native.py` where it is available (same noise, same
    tokens up to float rounding of the logs; ~10x faster at [64, 264]); else in PyTorch below.
    """
    if fused and not rows.any_top_p and logits.dtype == torch.float32 and native.available():
        return native.sample(logits.contiguous(), rows.temperature, rows.keys, counters)
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    if rows.all_greedy:
        tokens = logits.argmax(dim=-1)  # [B]
    else:
        temp = rows.temperature.clamp_min(1e-6)[:, None]  # [B, 1]; greedy rows are overridden below
        scaled = logits / temp  # [B, V]
        if rows.any_top_p:
            scaled.masked_fill_(top_p_mask(torch.softmax(scaled, dim=-1), rows.top_p), float("-inf"))
        gumbel = -torch.log(-torch.log(uniform(rows.keys, counters, logits.shape[-1])))  # [B, V]
        tokens = (scaled + gumbel).argmax(dim=-1)  # [B]
        tokens = torch.where(rows.temperature == 0, logits.argmax(dim=-1), tokens)  # [B]
    return tokens, logp.gather(1, tokens[:, None])[:, 0]
