"""The CPU rollout engine: continuous batching over a preallocated KV cache, one generation path.

Every active sequence owns a row ("slot") of the KV cache. Each `step()` runs, in order:

1. decode: one `decode_step` for all rows that already hold a sampled token (one token each);
2. admit: waiting requests take the free slots; their prompts are prefilled together, packed
   without padding, and each prompt's keys/values are copied into the slots of all its samples (a
   prompt asked for n times is computed once);
3. sample: one batched draw for all rows (per-row temperature, top-p and seed; see `sampling.py`),
   then per-row bookkeeping: EOS, stop strings (`detok.TextStream`), `max_tokens`;
4. compact: finished or aborted rows free their slots at once and the last rows move into the holes,
   so the next decode runs on exactly the live rows (cache rows copied up to their length only).

`generate(prompts, n, params)` is this same loop driven to completion, so RL rollouts, evaluation,
teacher sampling and the server share one code path. Models with a lean forward (`kernels.py`: GPT-2,
Qwen2/Llama/Mistral) run on it; any other causal LM falls back to the HF forward with one HF cache per
row (`_HFBackend`): correct, slower.

Thread-safety: one re-entrant lock guards all state. `add_request`/`abort` may be called from any
thread; they wait for a running `step()` to finish (a few milliseconds) and then act at once.
`generate()` holds the lock for the whole call and refuses to run while streaming requests are live.

Weights: the engine reads the model's weights at construction and again whenever a parameter was
modified in place (an optimizer step, `load_state_dict`) before the next `generate()`; call
`sync_weights()` to force it (e.g. between server requests after swapping weights).

    engine = CPUEngine(model, tokenizer)
    outs = engine.generate([[{"role": "user", "content": "1+1?"}]], n=4, params=SamplingParams(max_tokens=64))
"""

from __future__ import annotations

import copy
import inspect
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from r1lab.config import R1labError
from r1lab.rollout import kernels
from r1lab.rollout.base import Completion, Prompt, SamplingParams
from r1lab.rollout.detok import TextStream
from r1lab.rollout.sampling import RowParams, derive_key, sample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_KEEP_TOKENS = ("<think>", "</think>")  # special or not, these stay in the text


@dataclass
class StepOutput:
    """What one request produced in one `step()`."""

    request_id: str
    token_id: int | None
    logprob: float | None
    text_delta: str
    finished: bool
    finish_reason: str | None


@dataclass(eq=False)
class _Seq:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    key: int  # random stream of this sequence
    max_new: int
    stream: TextStream | None  # None: text decoded once at the end (no stop strings, nobody streaming)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""


@dataclass(eq=False)
class _Group:
    """Samples of one prompt waiting for slots; the prompt's cache and logits are kept until all are placed."""

    prompt_ids: list[int]
    seqs: deque[_Seq]
    prefix: object = None  # backend-specific prompt cache, set by prefill
    logits: torch.Tensor | None = None  # [V] next-token logits after the prompt


class _LeanBackend:
    """Slots in one preallocated cache, forwards from `kernels`."""

    def __init__(self, lm: kernels.LeanModel):
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
        kernels.ensure_rope(lm, length)

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[object]]:
        lens = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)  # [N]
        logits, kv = kernels.prefill(self.lm, tokens, lens)  # [P, V], L x ([N, H_kv, D], [N, H_kv, D])
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

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, n_ctx: int) -> torch.Tensor:
        return kernels.decode_step(self.lm, self.k, self.v, tokens, pos, n_ctx)

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class _HFBackend:
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
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, **{self._cache_kw: cache})
        return out.logits[0, -1].float(), out.past_key_values  # [V], cache

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[object]]:
        outs = [self._forward(p) for p in prompts]
        return torch.stack([o[0] for o in outs]), [o[1] for o in outs]

    def place(self, prefix, slots: list[int]) -> None:
        for s in slots:
            self.caches[s] = copy.deepcopy(prefix)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, n_ctx: int) -> torch.Tensor:
        rows = []
        for b, t in enumerate(tokens.tolist()):
            logits, self.caches[b] = self._forward([t], self.caches[b])
            rows.append(logits)
        return torch.stack(rows)  # [B, V]

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None


def _params_error(p: SamplingParams) -> str | None:
    if not p.temperature >= 0:
        return f"temperature must be >= 0 (got {p.temperature})"
    if not 0 < p.top_p <= 1:
        return f"top_p must be in (0, 1] (got {p.top_p})"
    if p.max_tokens < 1:
        return f"max_tokens must be >= 1 (got {p.max_tokens})"
    return None


class CPUEngine:
    """Batched generation with a KV cache on CPU; implements `Sampler` and the continuous-batching step API."""

    def __init__(self, model, tokenizer, dtype: str = "float32", seed: int = 0, max_batch: int = 256):
        if dtype not in _DTYPES:
            raise R1labError(f"CPUEngine: dtype must be one of {sorted(_DTYPES)} (got {dtype!r})")
        if max_batch < 1:
            raise R1labError(f"CPUEngine: max_batch must be >= 1 (got {max_batch})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.dtype = _DTYPES[dtype]
        self.max_batch = max_batch
        self._gen = torch.Generator().manual_seed(seed)
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self.eos_ids = self._eos_ids()
        keep = {tokenizer.convert_tokens_to_ids(t) for t in _KEEP_TOKENS if t in tokenizer.get_vocab()}
        self._skip = frozenset(tokenizer.all_special_ids) - keep
        backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer: no Python wrapper per call
        self._raw_decode = backend.decode if backend is not None else tokenizer.decode
        self._waiting: deque[_Group] = deque()
        self._rows: list[_Seq] = []  # slot i holds _rows[i]
        self._live: dict[str, _Seq] = {}
        self._tok = torch.empty(0, dtype=torch.int64)  # [B] last sampled token per row
        self._pos = torch.empty(0, dtype=torch.int64)  # [B] its position (= tokens already cached)
        self._count = torch.empty(0, dtype=torch.int64)  # [B] tokens drawn so far (noise counter)
        self._row_params: RowParams | None = None  # rebuilt when rows change
        self.sync_weights()

    # ------------------------------------------------------------------ setup

    def _eos_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
        return frozenset(i for i in ids if i is not None)

    def _weights_version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def sync_weights(self) -> None:
        """(Re)read the weights from the model; keeps the cache and any live requests."""
        with self._lock, torch.inference_mode():
            lm = kernels.lean_from_hf(self.model, self.dtype)
            old = getattr(self, "_backend", None)
            if isinstance(lm, kernels.LeanModel):
                self.fallback_reason = None
                if isinstance(old, _LeanBackend):
                    old.lm, old.max_len = lm, lm.max_len
                    kernels.ensure_rope(lm, max(1, old.capacity()[1]))
                else:
                    self._backend = _LeanBackend(lm)
            else:
                self.fallback_reason = lm
                # A converted copy, so that the caller's (training) model keeps its dtype.
                model = (
                    self.model if self.model.dtype == self.dtype else copy.deepcopy(self.model).to(self.dtype)
                )
                if isinstance(old, _HFBackend):
                    old.model = model
                else:
                    self._backend = _HFBackend(model)
            self._version = self._weights_version()

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue one request; it is prefilled by the next `step()` that has a free slot."""
        with self._lock:
            if request_id in self._live:
                raise R1labError(f"add_request: request id {request_id!r} is already active")
            seed = params.seed if params.seed is not None else self._random_seed()
            seq = self._new_seq(request_id, list(prompt_ids), params, derive_key(seed, 0), stream=True)
            self._waiting.append(_Group(seq.prompt_ids, deque([seq])))
            self._live[request_id] = seq

    def abort(self, request_id: str) -> None:
        """Forget a request now; its slot is free for the next step. Unknown ids are ignored."""
        with self._lock:
            seq = self._live.pop(request_id, None)
            if seq is None:
                return
            seq.finish_reason = "abort"
            for g in self._waiting:
                if seq in g.seqs:
                    g.seqs.remove(seq)
            self._waiting = deque(g for g in self._waiting if g.seqs)
            if seq in self._rows:
                self._compact()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    def _random_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._gen).item())

    def _new_seq(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, key: int, stream: bool
    ) -> _Seq:
        err = _params_error(params)
        if err:
            raise R1labError(f"request {rid!r}: {err}")
        if not prompt_ids:
            raise R1labError(f"request {rid!r}: empty prompt")
        room = self._backend.max_len - len(prompt_ids)
        if room < 1:
            raise R1labError(
                f"request {rid!r}: prompt has {len(prompt_ids)} tokens; the model takes {self._backend.max_len}"
            )
        ts = TextStream(self._decode, self._skip, params.stop) if stream or params.stop else None
        return _Seq(rid, prompt_ids, params, key, min(params.max_tokens, room), ts)

    def _decode(self, ids: list[int]) -> str:
        return self._raw_decode(ids, skip_special_tokens=False)

    def text_of(self, token_ids: list[int]) -> str:
        """Completion text: special tokens dropped except <think>/</think>."""
        return self._decode([t for t in token_ids if t not in self._skip])

    # ------------------------------------------------------------------ the step

    def step(self) -> list[StepOutput]:
        """One forward for every active request (decode the running, prefill newcomers); one token each."""
        with self._lock, torch.inference_mode():
            old = len(self._rows)
            logits = []
            if old:
                n_ctx = int(self._pos.max()) + 1
                logits.append(self._backend.decode(self._tok, self._pos, n_ctx))  # [B_old, V]
                self._pos += 1
            new_logits = self._admit()
            if new_logits is not None:
                logits.append(new_logits)  # [B_new, V]
            if not logits:
                return []
            if self._row_params is None:
                self._row_params = RowParams.build(
                    [s.params.temperature for s in self._rows],
                    [s.params.top_p for s in self._rows],
                    [s.key for s in self._rows],
                )
            all_logits = logits[0] if len(logits) == 1 else torch.cat(logits)  # [B, V]
            tokens, logps = sample(all_logits, self._row_params, self._count)  # [B], [B]
            self._tok = tokens
            self._count += 1
            outs = [
                self._advance(seq, t, lp)
                for seq, t, lp in zip(self._rows, tokens.tolist(), logps.tolist(), strict=True)
            ]
            if any(s.finish_reason for s in self._rows):
                self._compact()
            return outs

    def _reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` slots of `length` positions, growing geometrically (few copies)."""
        have_rows, have_len = self._backend.capacity()
        if rows > have_rows:
            rows = min(self.max_batch, max(rows, 2 * have_rows))
        if length > have_len:
            length = min(self._backend.max_len, max(length, 2 * have_len))
        self._backend.reserve(rows, length)

    def _admit(self) -> torch.Tensor | None:
        """Give free slots to waiting samples (prefilling new prompts once); logits [B_new, V] of the placed."""
        free = self.max_batch - len(self._rows)
        if free <= 0 or not self._waiting:
            return None
        take: list[tuple[_Group, list[_Seq]]] = []
        for g in self._waiting:
            if free <= 0:
                break
            seqs = [g.seqs.popleft() for _ in range(min(free, len(g.seqs)))]
            take.append((g, seqs))
            free -= len(seqs)
        self._waiting = deque(g for g in self._waiting if g.seqs)
        need = [g for g, _ in take if g.prefix is None]
        if need:
            logits, prefixes = self._backend.prefill([g.prompt_ids for g in need])
            for g, lg, px in zip(need, logits, prefixes, strict=True):
                g.logits, g.prefix = lg, px
        placed = sum(len(s) for _, s in take)
        self._reserve(
            len(self._rows) + placed, max(len(s.prompt_ids) + s.max_new for _, seqs in take for s in seqs)
        )
        rows = []
        for g, seqs in take:
            slots = list(range(len(self._rows), len(self._rows) + len(seqs)))
            self._backend.place(g.prefix, slots)
            self._rows += seqs
            rows += [g.logits] * len(seqs)
            if not g.seqs:
                g.prefix = None  # all samples placed: free the prompt cache
        new_pos = [len(s.prompt_ids) for _, seqs in take for s in seqs]
        self._pos = torch.cat([self._pos, torch.tensor(new_pos, dtype=torch.int64)])
        self._count = torch.cat([self._count, torch.zeros(placed, dtype=torch.int64)])
        self._row_params = None
        return torch.stack(rows)  # [B_new, V]

    def _advance(self, seq: _Seq, token: int, logprob: float) -> StepOutput:
        """Record one sampled token; decide whether the sequence ends and what text it adds."""
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        reason, delta = None, ""
        if token in self.eos_ids:
            reason = "stop"
        elif seq.stream is not None:
            delta = seq.stream.push(token)
            if seq.stream.stop_at is not None:
                reason = "stop"
                self._cut_stop(seq)
        if reason is None and len(seq.tokens) >= seq.max_new:
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            if seq.stream is not None:
                delta += seq.stream.flush()
                seq.text = seq.stream.text
            else:
                seq.text = self.text_of(seq.tokens)
            self._live.pop(seq.request_id, None)
        return StepOutput(seq.request_id, token, logprob, delta, reason is not None, reason)

    def _cut_stop(self, seq: _Seq) -> None:
        """Drop the tokens that spell the stop string (a token straddling its start goes too)."""
        stop_at = seq.stream.stop_at
        k = len(seq.tokens) - 1
        while k > 0 and len(self.text_of(seq.tokens[:k])) > stop_at:
            k -= 1
        del seq.tokens[k:], seq.logprobs[k:]

    def _compact(self) -> None:
        """Move the last live rows into the holes left by finished ones; rows stay contiguous."""
        rows = self._rows
        alive = [i for i, s in enumerate(rows) if s.finish_reason is None]
        n = len(alive)
        holes = [i for i in range(n) if rows[i].finish_reason is not None]
        movers = [i for i in alive if i >= n]
        pos = self._pos.tolist()
        for hole, src in zip(holes, movers, strict=True):
            self._backend.move(src, hole, pos[src])
        order = list(range(n))
        for hole, src in zip(holes, movers, strict=True):
            order[hole] = src
        idx = torch.tensor(order, dtype=torch.int64)
        self._rows = [rows[i] for i in order]
        self._backend.truncate(n)
        self._tok, self._pos, self._count = self._tok[idx], self._pos[idx], self._count[idx]
        self._row_params = None

    # ------------------------------------------------------------------ Sampler

    def encode(self, prompt: Prompt) -> list[int]:
        """Chat messages through the chat template (with the generation prompt); raw text as-is."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            text = prompt
        else:
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[Prompt], n: int, params: SamplingParams) -> list[Completion]:
        """Sample n completions per prompt; completion i*n+j is sample j of prompt i."""
        if n < 1:
            raise R1labError(f"generate: n must be >= 1 (got {n})")
        with self._lock:
            if self._live:
                raise R1labError("generate: the engine is serving streaming requests; use add_request/step")
            if self._weights_version() != self._version:
                self.sync_weights()
            seed = params.seed if params.seed is not None else self._random_seed()
            seqs: list[_Seq] = []
            try:
                call = next(self._ids)
                for i, prompt in enumerate(prompts):
                    ids = self.encode(prompt)
                    group = [
                        self._new_seq(
                            f"\x00gen{call}:{i * n + j}", ids, params, derive_key(seed, i * n + j), False
                        )
                        for j in range(n)
                    ]
                    seqs += group
                    self._waiting.append(_Group(ids, deque(group)))
                    self._live.update((s.request_id, s) for s in group)
                if seqs:
                    # One allocation for the whole call: every row and the longest sequence fit.
                    self._backend.reserve(
                        min(self.max_batch, len(seqs)), max(len(s.prompt_ids) + s.max_new for s in seqs)
                    )
                while self._live:
                    self.step()
            except BaseException:
                for s in seqs:
                    self.abort(s.request_id)
                raise
        return [
            Completion(
                prompt_index=k // n,
                text=s.text,
                token_ids=s.tokens,
                logprobs=s.logprobs,
                finish_reason=s.finish_reason,
                prompt_token_ids=s.prompt_ids,
            )
            for k, s in enumerate(seqs)
        ]
