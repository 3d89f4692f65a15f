"""Sequence packing for training forwards: several sequences per row, none attending to another.

Right-padding a micro-batch of sequences of different lengths runs the model on padding; packing
lays the sequences end to end in rows of `row_len` tokens (first-fit decreasing) with position ids
that restart at each sequence. Given position ids and no attention mask, transformers builds the
block-diagonal causal mask itself (`masking_utils.find_packed_sequence_indices`), so each sequence
sees exactly the tokens it would see alone. Whether a model honours that is checked once per model
on a probe (`packing_supported`); callers fall back to padding where it does not.

`packed_token_logprobs` is `token_logprobs` on the right-padded batch, computed on packed rows and
returned in the padded layout (`[B, L-1]`, padding 0.0), so every loss built on the padded layout
stays as it is. Where `fused.supported(model)` (Qwen2, Llama and GPT-2 on CPU, checked against HF's
logits once per model structure), the rows run through r1lab's own forward instead (`fused.py`): the same
function, with the matmuls on the unpadded tokens and the elementwise work in C. Measured by benchmarks/train_throughput.py (the GRPO update, 64 rows of 30-90
tokens, 2 CPU threads): see benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1lab.modeling import fused
from r1lab.modeling.fused import MATH_ATTENTION_MAX_WIDTH
from r1lab.modeling.logprobs import _GatherLogSoftmax, token_logprobs


def pack_rows(lengths: Sequence[int], indices: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: items laid end to end in as few rows of `row_len` tokens as it finds."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(indices, key=lambda j: (-lengths[j], j)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def pack_micro_batches(
    lengths: Sequence[int], indices: Sequence[int], row_len: int, token_budget: int
) -> list[list[list[int]]]:
    """Packed rows grouped into micro-batches of `token_budget // row_len` rows (at least one)."""
    rows = pack_rows(lengths, indices, row_len)
    per = max(1, token_budget // row_len)
    return [rows[i : i + per] for i in range(0, len(rows), per)]


def packed_tensors(rows: list[list[list[int]]], row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and position ids `[R, W]` of rows of sequences, W = the fullest row (<= row_len).

    The padding tail of a row counts its positions up from 0 too: transformers sees it as one more
    sequence, attending only to itself (callers give it no loss). It repeats the row's first token
    rather than a pad id, which would make transformers warn that an attention mask is missing.
    """
    width = min(row_len, max(sum(len(s) for s in row) for row in rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # [R, W]
    pos = torch.zeros((len(rows), width), dtype=torch.long)  # [R, W]
    for r, row in enumerate(rows):
        t = 0
        for s in row:
            ids[r, t : t + len(s)] = torch.tensor(s)
            pos[r, t : t + len(s)] = torch.arange(len(s))
            t += len(s)
        pos[r, t:] = torch.arange(width - t)
        ids[r, t:] = ids[r, 0]
    return ids, pos


def packed_token_logprobs(
    model, seqs: list[list[int]], row_len: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` of the right-padded `seqs` (log-probs, entropies `[B, L-1]`), run packed.

    Column j of row b is about token j+1 of `seqs[b]`; columns past its end are 0.0. Every sequence
    must fit in a row (`len <= row_len`).
    """
    longest = max(len(s) for s in seqs)
    if longest > row_len:
        raise ValueError(f"a sequence of {longest} tokens does not fit rows of {row_len}")
    layout = pack_rows([len(s) for s in seqs], range(len(seqs)), row_len)
    if fused.supported(model):
        # r1lab's own forward: the rows' tokens as one unpadded stream, scored like one long row
        logits, flat = fused.fused_logits(model, [[seqs[i] for i in row] for row in layout])  # [T, V], [T]
        logits, ids = logits[None], flat[None]  # [1, T, V], [1, T]
        layout = [[i for row in layout for i in row]]
    else:
        ids, pos = packed_tensors([[seqs[i] for i in row] for row in layout], row_len)  # [R, W] each
        dev = next(model.parameters()).device
        ids, pos = ids.to(dev), pos.to(dev)
        with attention_backend(dev, ids.shape[1]):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # [R, W, V]
    # the logits whole (position k scores ids[:, k+1]; the last is ignored): slicing would copy them
    logp, entropy = _GatherLogSoftmax.apply(logits, ids[:, 1:], float(temperature), True)  # [R, W-1]
    width = ids.shape[1]
    # index[b, j]: where in the flattened [R*(W-1)] scores the prediction of seqs[b][j+1] lies;
    # past the sequence's end it points at one extra zero appended after them.
    blank = len(layout) * (width - 1)
    index = torch.full((len(seqs), longest - 1), blank, dtype=torch.long)  # [B, L-1]
    for r, row in enumerate(layout):
        start = r * (width - 1)
        for i in row:
            n = len(seqs[i]) - 1
            index[i, :n] = torch.arange(start, start + n)
            start += n + 1
    index = index.to(ids.device)

    def unpack(x: torch.Tensor) -> torch.Tensor:  # [R, W-1] -> [B, L-1]
        flat = torch.cat([x.reshape(-1), x.new_zeros(1)])  # [R*(W-1) + 1]
        return flat[index]

    return unpack(logp), unpack(entropy)


def attention_backend(device: torch.device, width: int):
    """The SDPA backend for packed rows of `width` tokens: on CPU, for short rows, the math kernel.

    Under the block-diagonal mask of packed rows, PyTorch's CPU flash-attention kernel (forward and
    above all backward) costs far more than its FLOPs at these widths: the GRPO update of
    benchmarks/train_throughput.py (64 sequences of 30-90 tokens, rows of ~90) took 0.31 s with it
    and 0.25 s with the math kernel (two batched matmuls and a softmax) at qwen2-4m in bf16, 1.90
    vs 1.62 s at qwen2-34m; in fp32 0.61 vs 0.58 and 4.54 vs 4.20 s (AVX-512 EPYC, 2 threads). The
    math kernel holds a [rows, heads, W, W] score tensor, so long rows keep the default. GPUs keep
    their fused kernels. Same values up to float rounding (tests/unit/test_packing.py).
    """
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cpu" and width <= MATH_ATTENTION_MAX_WIDTH:
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


def packing_supported(model) -> bool:
    """Whether `model` keeps packed sequences apart (given position ids and no mask); checked once.

    Two short sequences are scored packed in one row and right-padded in two; the log-probs must
    agree. The answer is cached on the model object.
    """
    cached = getattr(model, "_r1lab_packing_ok", None)
    if cached is not None:
        return cached
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout while comparing
    try:
        vocab = model.get_input_embeddings().num_embeddings
        seqs = [[(7 * k + 3) % vocab for k in range(6)], [(5 * k + 1) % vocab for k in range(4)]]
        with torch.no_grad():
            packed, _ = packed_token_logprobs(model, seqs, row_len=10)
            ids = torch.tensor([seqs[0], seqs[1] + [0, 0]], device=dev)  # [2, 6]
            attn = torch.tensor([[1] * 6, [1] * 4 + [0, 0]], device=dev)  # [2, 6]
            padded, _ = token_logprobs(model, ids, attn)  # [2, 5]
        ok = bool(torch.allclose(packed.float(), padded.float(), atol=1e-4, rtol=1e-4))
    except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError, IndexError):
        ok = False  # a model this probe cannot even run is trained padded
    finally:
        model.train(was_training)
    model._r1lab_packing_ok = ok
    return ok
