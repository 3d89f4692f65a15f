"""Measure SFT throughput: length bucketing vs packing, fp32 vs bf16 autocast, on tiny models.

    python -m r1lab.sft.bench [--steps 30] [--presets gpt2-3m qwen2-4m] [--threads 2]

Two data sets of chat traces, both through the real data path (`encode`, `step_micro_batches`,
`accumulate`, AdamW step):
  * `corpus`: the tiny model's own arithmetic corpus (direct answers, column working and
    self-checks: 20 to ~150 tokens, the distribution `r1lab sft` sees on CPU);
  * `long-tail`: synthetic traces whose lengths are log-uniform over 16..480 tokens, the shape of
    real reasoning traces, where padding costs bucketing the most.
Each configuration trains one epoch over the same examples (so the same tokens), alternating between the two
batching modes (so load from other processes hits both alike); reported tokens/s count real
(non-padding) tokens and are the median over rounds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import torch

from r1lab.config import TaskSpec
from r1lab.modeling import build_char_tokenizer, build_model
from r1lab.modeling.onednn import use_onednn_linears
from r1lab.modeling.train_state import make_optimizer
from r1lab.sft.data import Example, encode, epoch_steps, step_micro_batches
from r1lab.sft.train import accumulate


def corpus_examples(tokenizer, n: int) -> list[Example]:
    from r1lab.tasks import load_task
    from r1lab.tasks.corpus import CorpusMix, build_arithmetic_corpus

    problems = load_task(TaskSpec(name="arithmetic", split="train", limit=n, seed=5))
    pairs = build_arithmetic_corpus(
        problems, CorpusMix(direct=0.5, working=0.35, check=0.15, slip_rate=0.4), 5
    )
    return [encode(tokenizer, [*p.messages, {"role": "assistant", "content": c}]) for p, c in pairs]


def long_tail_examples(tokenizer, n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(math.exp(rng.uniform(math.log(16), math.log(480))))
        body = "".join(rng.choice("0123456789+= \n") for _ in range(length))
        msgs = [
            {"role": "user", "content": "12+34"},
            {"role": "assistant", "content": f"<think>{body}</think>46"},
        ]
        out.append(encode(tokenizer, msgs))
    return out


def run_mode(
    model, examples, how: str, steps: int, batch: int, budget: int, row_len: int, bf16: bool, pad: int
):
    """(real tokens/s, padding fraction) over `steps` optimiser steps."""
    opt = make_optimizer(model, 1e-4, 0.0, (0.9, 0.95))
    plan = epoch_steps(
        len(examples), batch, 0, 0, [len(e.ids) for e in examples] if how == "bucket" else None
    )
    for s in range(2):  # warm-up (allocator, first-call costs), not timed
        accumulate(
            model, step_micro_batches(examples, plan[s], how, budget, row_len, pad), bf16, torch.device("cpu")
        )
    model.zero_grad(set_to_none=True)
    real = padded = 0
    t0 = time.perf_counter()
    for s in range(steps):
        mbs = step_micro_batches(examples, plan[s % len(plan)], how, budget, row_len, pad)
        accumulate(model, mbs, bf16, torch.device("cpu"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += sum(mb.real_tokens for mb in mbs)
        padded += sum(mb.input_ids.numel() for mb in mbs)
    return real / (time.perf_counter() - t0), 1 - real / padded


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="conversations per step")
    ap.add_argument("--budget", type=int, default=4096, help="micro_batch_tokens")
    ap.add_argument("--presets", nargs="+", default=["gpt2-3m", "qwen2-4m"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    datasets = {
        "corpus": (corpus_examples(tok, 2000), 256),
        "long-tail": (long_tail_examples(tok, 2000), 512),
    }
    results = {}
    for preset in args.presets:
        for name, (examples, row_len) in datasets.items():
            for bf16 in (False, True):
                rates: dict[str, list[float]] = {"bucket": [], "pack": []}
                pads: dict[str, float] = {}
                for _ in range(args.rounds):
                    for how in ("bucket", "pack"):
                        model = build_model(preset, tok, seed=0).train()
                        use_onednn_linears(model)  # as `r1lab sft` does
                        rate, pad_frac = run_mode(
                            model,
                            examples,
                            how,
                            args.steps,
                            args.batch,
                            args.budget,
                            row_len,
                            bf16,
                            tok.pad_token_id,
                        )
                        rates[how].append(rate)
                        pads[how] = pad_frac
                key = f"{preset}/{name}/{'bf16' if bf16 else 'fp32'}"
                results[key] = {
                    how: {"tok_per_s": round(statistics.median(r)), "pad_frac": round(pads[how], 3)}
                    for how, r in rates.items()
                }
                b, p = results[key]["bucket"], results[key]["pack"]
                print(
                    f"{key:32s} bucket {b['tok_per_s']:7d} tok/s (pad {b['pad_frac']:.0%})   "
                    f"pack {p['tok_per_s']:7d} tok/s (pad {p['pad_frac']:.0%})   pack/bucket {p['tok_per_s'] / b['tok_per_s']:.2f}",
                    flush=True,
                )
    summary = {
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "batch": args.batch,
        "results": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
