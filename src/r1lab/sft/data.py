"""SFT data: chat-format JSONL traces -> token ids with an assistant-only loss mask -> micro-batches.

Reading (`read_conversations`): one JSON object per line with `messages`, a list of
`{"role": "system"|"user"|"assistant", "content": str}`; an assistant message may carry
`reasoning_content` (DeepSeek's API split), which is folded back as `<think>...</think>` before the
content. `r1lab sample` writes exactly these rows (plus a `meta` field that is ignored here).

The mask (`encode`): the conversation is rendered once with the tokenizer's own chat template.
Each assistant turn's character span is found by rendering the conversation up to that turn twice,
with the generation prompt (where the turn starts) and with the turn (where it ends), so the span
covers the turn's content and whatever the template closes it with (the EOS, `<|im_end|>`), and
nothing of the prompt. Tokens whose character offsets fall inside a span are targets. Working on
characters rather than on token prefixes keeps this right for BPE tokenizers, whose tokens may
merge across the boundary of two separate renderings.

Batching: both ways keep the loss a token-mean over the whole optimiser step, so how a step is
cut into micro-batches never changes the gradient.
  * `bucket` (default): each epoch's shuffled order is sorted by length within windows of 16
    steps, so a step holds conversations of similar length; its micro-batches are right-padded
    to their longest row with rows x width <= `micro_batch_tokens`;
  * `pack`: a step's conversations laid end to end in rows of `max_seq_len` (first-fit
    decreasing), with position ids restarting at each conversation and attention kept inside each
    one (transformers builds the block-diagonal mask from the position ids when no attention mask
    is passed; a test checks the logits equal unpacked ones).
Measured with `python -m r1lab.sft.bench` (one epoch of the same tokens each way, 2 pinned CPU
threads): bucketing pads only 5-8% of tokens, so packing has little to win and pays for its
block-diagonal mask. Bucketing was faster in 6 of 8 settings (pack/bucket 0.76-0.97 in fp32,
0.90-1.17 with bf16 autocast): gpt2-3m ~6.6k tok/s fp32 / ~7.8k bf16 on the arithmetic corpus,
qwen2-4m ~5.7k / ~7.5k. On an H200 (Qwen2.5-0.5B shape, traces of 256-4096 tokens, bf16 autocast)
bucketing gave ~52k tok/s against ~45k for packing. So bucketing is the default; packing stays an
option.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from r1lab.config import R1labError
from r1lab.modeling.packing import pack_micro_batches, packed_tensors
from r1lab.rollout.http import join_reasoning

ROLES = ("system", "user", "assistant")


class TraceError(R1labError):
    """A traces file that cannot be trained on; the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    """One tokenised conversation; `targets[t]` says token t is an assistant token the loss predicts."""

    ids: list[int]
    targets: list[bool]

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


def _check_message(m: object, where: str, field: str) -> dict[str, str]:
    """One message of a row; `where` is "file:line", `field` its path, e.g. "messages[2]"."""
    if not isinstance(m, dict):
        raise TraceError(f"{where}: field '{field}': expected an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise TraceError(f"{where}: field '{field}.role': expected one of {', '.join(ROLES)}, got {role!r}")
    reasoning = m.get("reasoning_content")
    if content is None and isinstance(reasoning, str):
        content = ""
    if not isinstance(content, str):
        raise TraceError(f"{where}: field '{field}.content': expected a string, got {type(content).__name__}")
    if reasoning is not None and not isinstance(reasoning, str):
        kind = type(reasoning).__name__
        raise TraceError(f"{where}: field '{field}.reasoning_content': expected a string, got {kind}")
    if role == "assistant" and reasoning:
        content = join_reasoning(reasoning, content)
    return {"role": role, "content": content}


def parse_row(row: object, where: str) -> list[dict[str, str]]:
    """Validate one JSONL row and return its messages (reasoning folded into `<think>`)."""
    if not isinstance(row, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise TraceError(f"{where}: field 'messages': expected a non-empty list of messages")
    out = [_check_message(m, where, f"messages[{i}]") for i, m in enumerate(msgs)]
    first = next(i for i, m in enumerate(out + [{"role": "user"}]) if m["role"] != "system")
    if first < len(out) and out[first]["role"] != "user":
        raise TraceError(f"{where}: field 'messages[{first}].role': the first non-system turn must be 'user'")
    if not any(m["role"] == "assistant" for m in out):
        raise TraceError(f"{where}: field 'messages': no assistant turn to train on")
    return out


def read_conversations(paths: list[str | Path]) -> list[list[dict[str, str]]]:
    """All conversations of the given JSONL files, in file order; blank lines are skipped."""
    if not paths:
        raise TraceError("field 'data': no traces file given")
    convs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise TraceError(f"{path}: no such traces file")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TraceError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                convs.append(parse_row(row, f"{path}:{n}"))
    if not convs:
        raise TraceError(f"{', '.join(map(str, paths))}: no conversations")
    return convs


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the `[start, end)` character span of every assistant turn in it."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], add_generation_prompt=True)
        end_text = _render(tokenizer, messages[: i + 1])
        if not (
            text.startswith(start_text) and text.startswith(end_text) and len(start_text) < len(end_text)
        ):
            raise TraceError(
                f"the chat template does not render assistant turn {i} as an extension of the prompt "
                "before it, so its tokens cannot be located; use a template that renders turns in order"
            )
        if m["content"].strip() not in text[len(start_text) : len(end_text)]:
            # e.g. DeepSeek-R1's template, which drops the <think> part of assistant turns: training
            # on its rendering would silently teach answers without their reasoning
            raise TraceError(
                f"the chat template rewrites assistant turn {i} (its content is not rendered as given); "
                "use a template that keeps the whole trace"
            )
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Token ids of the rendered conversation and the assistant-only target mask (see the module docstring)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = [any(s < end and e > start for start, end in spans) and e > s for s, e in enc["offset_mapping"]]
    return Example(list(enc["input_ids"]), targets)


def encode_all(tokenizer, convs: list[list[dict[str, str]]], max_seq_len: int) -> tuple[list[Example], int]:
    """Encode every conversation; those longer than `max_seq_len` are dropped. Returns (examples, dropped)."""
    out, dropped = [], 0
    for conv in convs:
        ex = encode(tokenizer, conv)
        if len(ex.ids) > max_seq_len or ex.n_targets == 0:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


# --------------------------------------------------------------------------- the plan of steps


def epoch_steps(
    n_examples: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """Example indices of each optimiser step of one epoch: a seeded shuffle cut into batches.

    With `lengths` (bucketing), the shuffled order is sorted by length within windows of 16 batches
    before cutting, and the batches are shuffled again: each step holds conversations of similar
    length (little padding) while the order of steps stays random. A pure function of its
    arguments, so a resumed run finds the same steps from the step number alone. The last,
    smaller batch is kept (no example is silently skipped).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n_examples))
    rng.shuffle(order)
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
    window = batch_size * 16
    batches = []
    for w in range(0, n_examples, window):
        chunk = sorted(order[w : w + window], key=lambda i: (lengths[i], i))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def bucket_micro_batches(lengths: list[int], indices: list[int], token_budget: int) -> list[list[int]]:
    """Cut a step's examples, sorted by length, into micro-batches with rows x longest <= budget."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(indices, key=lambda j: (lengths[j], j)):
        if cur and (len(cur) + 1) * lengths[i] > token_budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


# --------------------------------------------------------------------------- tensors


@dataclass
class MicroBatch:
    """Model inputs for one forward/backward. `attention_mask` is None for packed rows (see docstring)."""

    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T] bool: the token at t is an assistant target (predicted from t-1)
    attention_mask: torch.Tensor | None  # [B, T] (bucket) or None (pack)
    position_ids: torch.Tensor | None  # [B, T] restarting per conversation (pack) or None (bucket)
    real_tokens: int  # tokens that are not padding

    def model_inputs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out


def collate_bucket(examples: list[Example], pad_id: int) -> MicroBatch:
    """Right-padded rows, one conversation each."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    attn = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    targets = torch.zeros((len(examples), width), dtype=torch.bool)  # [B, T]
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        attn[b, : len(e.ids)] = 1
        targets[b, : len(e.ids)] = torch.tensor(e.targets)
    return MicroBatch(ids, targets, attn, None, sum(len(e.ids) for e in examples))


def collate_pack(rows: list[list[Example]], row_len: int) -> MicroBatch:
    """Rows of conversations laid end to end; positions restart at each one, padding at the row's end
    (`r1lab.modeling.packing.packed_tensors`; the padding tail carries no loss)."""
    ids, pos = packed_tensors([[e.ids for e in row] for row in rows], row_len)  # [B, T] each
    targets = torch.zeros(ids.shape, dtype=torch.bool)  # [B, T]
    for b, row in enumerate(rows):
        t = 0
        for e in row:
            targets[b, t : t + len(e.ids)] = torch.tensor(e.targets)
            targets[b, t] = False  # a conversation's first token is never predicted from the previous one
            t += len(e.ids)
    return MicroBatch(ids, targets, None, pos, sum(len(e.ids) for row in rows for e in row))


def step_micro_batches(
    examples: list[Example], indices: list[int], how: str, token_budget: int, row_len: int, pad_id: int
) -> list[MicroBatch]:
    """The micro-batches of one optimiser step, by bucketing or packing."""
    lengths = [len(e.ids) for e in examples]
    if how == "pack":
        groups = pack_micro_batches(lengths, indices, row_len, token_budget)
        return [collate_pack([[examples[i] for i in row] for row in g], row_len) for g in groups]
    groups = bucket_micro_batches(lengths, indices, token_budget)
    return [collate_bucket([examples[i] for i in g], pad_id) for g in groups]
