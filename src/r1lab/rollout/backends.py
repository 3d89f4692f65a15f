"""Where the CPU engine's rows live and how they are run: one object per kind of forward.

A backend owns the per-row ("slot") state of the model and offers the engine six operations:
`capacity`, `reserve(rows, length)` (grow), `prefill(prompts) -> (last logits [P, V], prefixes)`,
`place(prefix, slots)` (copy a prompt's cache into the slots of its samples), `decode(tokens, pos,
n_ctx) -> logits [B, V]` for slots 0..B-1, `move(src, dst, length)` and `truncate(rows)` (compaction).

* `LeanBackend`: the preallocated cache `[L, S, H_kv, T_max, D]` and the forwards of `kernels.py`.
* `HFBackend`: any causal LM through its own HF forward and one HF cache per slot (the fallback).
"""

from __future__ import annotations

import copy
import inspect

import torch

from r1lab.rollout import kernels, lean


class LeanBackend:
    """Slots in one preallocated cache, forwards from `kernels`."""

    def __init__(self, lm: lean.LeanModel):
        self.lm = lm
        self.max_len = lm.max_len
        self.k = self.v = torch.empty(0)

    def capacity(self) -> tuple[int, int]:
        return (self.k.shape[1], self.k.shape[3]) if self.k.dim() == 5 else (0, 0)

    def truncate(self, rows: int) -> None:
        """Rows past `rows` are dead; their cache is simply overwritten later."""

    def reserve(self, rows: int, length: int) -> None:
        """Grow the cache to at least `rows` slots of `length` positions (copying what is there)."""
        lm = self.lm
        if self.k.dim() == 5 and self.k.shape[1] >= rows and self.k.shape[3] >= length:
            return
        old_rows, old_len = self.capacity()
        rows, length = max(rows, old_rows), max(length, old_len)
        shape = (lm.n_layers, rows, lm.n_kv_heads, length, lm.head_dim)
        # Zeros, not empty: attention multiplies the masked (never written) positions by a zero
        # weight, and 0 * NaN from stale memory would poison the row.
        k, v = torch.zeros(shape, dtype=lm.dtype), torch.zeros(shape, dtype=lm.dtype)
        if old_rows:
            k[:, :old_rows, :, :old_len] = self.k
            v[:, :old_rows, :, :old_len] = self.v
        self.k, self.v = k, v
        lean.ensure_rope(lm, length)

    def prefill(self, prompts: list[list[int]], fused: bool = True) -> tuple[torch.Tensor, list[object]]:
        lens = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)  # [N]
        logits, kv = kernels.prefill(self.lm, tokens, lens, fused)  # [P, V], L x ([N, H_kv, D], [N, H_kv, D])
        prefixes, start = [], 0
        for t in lens:
            k = torch.stack([kl[start : start + t].transpose(0, 1) for kl, _ in kv])  # [L, H_kv, t, D]
            v = torch.stack([vl[start : start + t].transpose(0, 1) for _, vl in kv])  # [L, H_kv, t, D]
            prefixes.append((k, v))
            start += t
        return logits, prefixes

    def place(self, prefix, slots: list[int]) -> None:
        k, v = prefix  # [L, H_kv, t, D] each
        t, idx = k.shape[2], torch.tensor(slots)
        shape = (k.shape[0], len(slots), *k.shape[1:])
        self.k[:, idx, :, :t] = k[:, None].expand(shape)  # [L, n, H_kv, t, D]
        self.v[:, idx, :, :t] = v[:, None].expand(shape)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, n_ctx: int, fused: bool) -> torch.Tensor:
        return kernels.decode_step(self.lm, self.k, self.v, tokens, pos, n_ctx, fused)

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class HFBackend:
    """Fallback for architectures without a lean forward: the HF model, one HF cache per slot."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        cfg = model.config
        self.max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1 << 30)
        self.caches: list[object] = []
        # transformers 5 renamed `past_key_values` to `cache`; accept both generations of the API.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def capacity(self) -> tuple[int, int]:
        return len(self.caches), self.max_len

    def truncate(self, rows: int) -> None:
        self.caches[rows:] = [None] * (len(self.caches) - rows)  # drop finished rows' caches

    def reserve(self, rows: int, length: int) -> None:
        self.caches += [None] * max(0, rows - len(self.caches))

    def _forward(self, ids: list[int], cache=None):
        if self.model.training:  # the caller may be training this model between rollouts
            self.model.eval()
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, **{self._cache_kw: cache})
        return out.logits[0, -1].float(), out.past_key_values  # [V], cache

    def prefill(self, prompts: list[list[int]], fused: bool = True) -> tuple[torch.Tensor, list[object]]:
        outs = [self._forward(p) for p in prompts]  # (`fused` has no meaning for the HF forward)
        return torch.stack([o[0] for o in outs]), [o[1] for o in outs]

    def place(self, prefix, slots: list[int]) -> None:
        for s in slots:
            self.caches[s] = copy.deepcopy(prefix)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, n_ctx: int, fused: bool) -> torch.Tensor:
        rows = []  # (`fused` has no meaning for the HF forward)
        for b, t in enumerate(tokens.tolist()):
            logits, self.caches[b] = self._forward([t], self.caches[b])
            rows.append(logits)
        return torch.stack(rows)  # [B, V]

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None
