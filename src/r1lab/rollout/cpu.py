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
row (`HFBackend`): correct, slower.

Thread-safety: `step()` and `generate()` hold the engine lock, so one runs at a time. `add_request`,
`abort` and `has_unfinished` may be called from any thread and never wait for a step: a new request
goes to an inbox the next step admits; an abort frees the slot at once when no step is running, else
when the running step ends (that step reports nothing for it). `generate()` refuses to start while
streaming requests are live, and `add_request` refuses while a `generate()` runs, so neither path
ever steps the other's requests and drops their tokens.

Speed (benchmarks/rollout_vs_hf.py; figures and history in benchmarks/README.md): batch 64, 64 new
tokens, 2 threads, with the C kernels of `native.py`, r1lab against HF `generate` in the same dtype:
2.9-3.1x in fp32 at both sizes, and in bf16 2.4x at qwen2-4m and 1.6x at qwen2-34m (whose step is
almost all bf16 GEMM and weight streaming) on the 2-core AVX-512 EPYC. `dtype="bfloat16"` runs the
matmuls in bf16 and keeps the residual stream, norms, attention and KV cache in fp32 (as autocast
does): on CPUs with native bf16 (AVX512-BF16, AMX) it is the faster engine (1.5-1.7x fp32 here), on
CPUs without it (AVX2 only) much slower than fp32. Threads: the engine leaves
`torch.set_num_threads` to its caller (it is process-wide); on a machine shared with other jobs one
thread can beat two by several times in wall time (OpenMP threads waiting on each other), on an
idle one the default wins.

Weights: the engine reads the model's weights at construction and again whenever a parameter was
modified in place (an optimizer step, `load_state_dict`) before the next `generate()`; call
`sync_weights()` to force it (e.g. between server requests after swapping weights).

    engine = CPUEngine(model, tokenizer)
    outs = engine.generate([[{"role": "user", "content": "1+1?"}]], n=4, params=SamplingParams(max_tokens=64))
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from r1lab.config import R1labError
from r1lab.rollout import lean
from r1lab.rollout.backends import HFBackend, LeanBackend
from r1lab.rollout.base import Completion, Prompt, SamplingParams, StepOutput
from r1lab.rollout.detok import TextStream
from r1lab.rollout.sampling import RowParams, derive_key, sample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_KEEP_TOKENS = ("<think>", "</think>")  # special or not, these stay in the text


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
        self.model = model  # left in its mode: a trainer may own it; the lean forward has no dropout
        self.tokenizer = tokenizer
        self.dtype = _DTYPES[dtype]
        self.max_batch = max_batch
        self._gen = torch.Generator().manual_seed(seed)
        self._lock = threading.RLock()  # held by step() and generate(): the engine's state
        self._inbox_lock = threading.Lock()  # held for microseconds: _live and _inbox
        self._inbox: list[_Seq] = []  # added by add_request, admitted by the next step()
        self._generating = False
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
        self.native = True  # the C kernels of native.py (decode step, sampling) where available
        self.pack = True  # oneDNN-packed fp32 weights where available (measured faster; see kernels)
        self.packed = False  # whether the current weights are packed
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
            lm = lean.lean_from_hf(self.model, self.dtype)
            old = getattr(self, "_backend", None)
            if isinstance(lm, lean.LeanModel):
                self.fallback_reason = None
                self.packed = self.pack and lean.pack_weights(lm, min(64, self.max_batch))
                if isinstance(old, LeanBackend):
                    old.lm, old.max_len = lm, lm.max_len
                    lean.ensure_rope(lm, max(1, old.capacity()[1]))
                else:
                    self._backend = LeanBackend(lm)
            else:
                self.fallback_reason = lm
                # A converted CPU copy, so that the caller's (training) model keeps its dtype and device.
                on_cpu = self.model.dtype == self.dtype and self.model.device.type == "cpu"
                model = self.model if on_cpu else copy.deepcopy(self.model).to(device="cpu", dtype=self.dtype)
                if isinstance(old, HFBackend):
                    old.model = model
                else:
                    self._backend = HFBackend(model)
            self._version = self._weights_version()

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue one request; the next `step()` with a free slot prefills it. Never waits for a step."""
        with self._inbox_lock:
            if self._generating:
                raise R1labError("add_request: the engine is inside generate(); wait for it to return")
            if request_id in self._live:
                raise R1labError(f"add_request: request id {request_id!r} is already active")
            seed = params.seed if params.seed is not None else self._random_seed()
            seq = self._new_seq(request_id, list(prompt_ids), params, derive_key(seed, 0), stream=True)
            self._live[request_id] = seq
            self._inbox.append(seq)

    def abort(self, request_id: str) -> None:
        """Forget a request. Its slot is freed now, or, if a step is running in another thread, when
        that step ends (it produces no output for the request). Unknown ids are ignored."""
        with self._inbox_lock:
            seq = self._live.pop(request_id, None)
            if seq is None:
                return
            seq.finish_reason = "abort"
        if self._lock.acquire(blocking=False):  # no step in flight (or we are inside one): free now
            try:
                self._reap()
            finally:
                self._lock.release()

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def _reap(self) -> None:
        """Admit the inbox to the queue; drop aborted requests from the queue and from the rows."""
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        self._waiting += [_Group(s.prompt_ids, deque([s])) for s in inbox if s.finish_reason is None]
        if any(s.finish_reason for g in self._waiting for s in g.seqs):
            for g in self._waiting:
                g.seqs = deque(s for s in g.seqs if s.finish_reason is None)
            self._waiting = deque(g for g in self._waiting if g.seqs)
        if any(s.finish_reason for s in self._rows):
            self._compact()

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
            self._reap()
            old = len(self._rows)
            logits = []
            if old:
                n_ctx = int(self._pos.max()) + 1
                logits.append(self._backend.decode(self._tok, self._pos, n_ctx, self.native))  # [B_old, V]
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
            tokens, logps = sample(all_logits, self._row_params, self._count, fused=self.native)  # [B], [B]
            self._tok = tokens
            self._count += 1
            outs = [
                self._advance(seq, t, lp)
                for seq, t, lp in zip(self._rows, tokens.tolist(), logps.tolist(), strict=True)
                if seq.finish_reason is None  # not aborted from another thread during this step
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
            logits, prefixes = self._backend.prefill([g.prompt_ids for g in need], self.native)
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
            with self._inbox_lock:
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
            with self._inbox_lock:
                if self._live:
                    raise R1labError(
                        "generate: the engine is serving streaming requests; use add_request/step"
                    )
                self._generating = (
                    True  # add_request refuses until we are done: nobody else's tokens are lost
                )
            try:
                return self._generate(prompts, n, params)
            finally:
                self._generating = False

    def _generate(self, prompts: list[Prompt], n: int, params: SamplingParams) -> list[Completion]:
        if self._weights_version() != self._version:
            self.sync_weights()
        seed = params.seed if params.seed is not None else self._random_seed()
        call = next(self._ids)
        seqs: list[_Seq] = []
        try:
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
                with self._inbox_lock:
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
