"""Tokens per second of r1lab's CPU engine against Hugging Face `generate`, plus the speed levers.

Same model, same 64 chat prompts (ragged: 20-32 tokens), 64 new tokens each, sampling at T=1 with no
top-k/top-p, and no early stop (r1lab: no EOS ids; HF: min_new_tokens), so both produce exactly
batch x 64 tokens. Models are the tiny presets of `r1lab.modeling` with the character tokenizer:
qwen2-4m (d256 x 4, GQA 4/2) and qwen2-34m (d512 x 8, GQA 8/2), in fp32 and bf16.

Two clocks: wall time, and process CPU time. On a shared machine (other jobs on the same cores)
wall time mostly measures the neighbours; with one thread, CPU time is the work this process did,
so `cpu_tok_s` is the figure to compare. Runs of r1lab and HF are interleaved and the best of
`--reps` is kept for each, so both see the same background load. The load average is printed.

A GRPO-shaped call (section `rl`): 16 prompts x 8 samples with early stops, r1lab vs HF generate
(num_return_sequences=8), counting real completion tokens.

Ablations (fp32; what each lever measured on the 2-core AVX2 box, qwen2-4m / qwen2-34m, CPU tok/s):
  pack        oneDNN-packed fp32 weights vs F.linear (MKL): 2174 vs 2027 / 401 vs 330   -> kept
  native      the C kernels (rollout/native.py: the decode step between its matmuls, and sampling)
              vs the PyTorch path, engine tok/s interleaved in one process (2 threads, quiet box,
              2026-11-30 08:05): 6105 vs 5182 (1.18x) / 1044 vs 977 (1.07x, a fifth of it prefill);
              the quickstart's GPT-2 at 16 prompts x 8 x 128 tokens 10098 vs 7136 (1.42x) -> kept
  attention   (kernel off) two batched matmuls vs F.sdpa(enable_gqa): 2332 vs 2387 /
              405 vs 411, equal within noise                                          -> matmuls kept
  grad_mode   decode_step under inference_mode vs no_grad: 2899 vs 3020 / 537 vs 559,
              equal within noise                                                      -> inference_mode
  threads     1 vs os.cpu_count() threads, wall tok/s on the shared box: 491 vs 77 / 191 vs 56
              -> the engine does not call set_num_threads; callers choose
  compaction  early stops: finished rows leave the batch vs decoding all rows to the longest:
              1.00 vs 1.55 s / 5.85 vs 8.73 s                                        -> kept
  batch       r1lab tok/s at batch 16, 64, 128, 256: 916, 2054, 2150, 2413 / 276, 431, 479, 538
  compile     torch.compile(decode_step, dynamic=True), only with --compile: 110 CPU-s to compile,
              then 847 vs 2823 tok/s eager (qwen2-4m)                                 -> dropped

    .venv/bin/python benchmarks/rollout_vs_hf.py                    # everything (~1 h on a busy 2-core box)
    .venv/bin/python benchmarks/rollout_vs_hf.py --presets qwen2-4m --dtypes float32 --sections head

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from r1lab.modeling import build_model
from r1lab.modeling.tokenizer import build_char_tokenizer
from r1lab.rollout import CPUEngine, SamplingParams, kernels, lean, native


def make_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        a, b = rng.randint(1, 10 ** rng.randint(1, 9)), rng.randint(1, 10 ** rng.randint(1, 9))
        prompts.append([{"role": "user", "content": f"What is {a} + {b}?"}])
    return prompts


def clocks(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def r1lab_run(engine: CPUEngine, prompts, new_tokens: int, seed: int) -> int:
    outs = engine.generate(prompts, 1, SamplingParams(temperature=1.0, max_tokens=new_tokens, seed=seed))
    return sum(len(o.token_ids) for o in outs)


def hf_run(model, batch: dict, new_tokens: int) -> int:
    with torch.inference_mode():
        out = model.generate(
            **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )  # fmt: skip
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]


def hf_batch(tok, prompts) -> dict:
    """Left-padded prompts, as HF generate wants them."""
    ids = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ids]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def best_rate(runs: list[tuple[int, float, float]]) -> dict:
    return {
        "wall_tok_s": round(max(n / w for n, w, _ in runs), 1),
        "cpu_tok_s": round(max(n / c for n, _, c in runs), 1),
    }


def head_to_head(preset, dtype, tok, args) -> dict:
    model = build_model(preset, tok, seed=0).eval()
    prompts = make_prompts(args.batch)
    engine = CPUEngine(model, tok, dtype=dtype)
    engine.eos_ids = frozenset()  # no early stop: exactly batch x new tokens
    hf_model = model if dtype == "float32" else copy.deepcopy(model).to(torch.bfloat16)
    batch = hf_batch(tok, prompts)
    r1lab_run(engine, prompts[:4], 4, 0)  # warm-up: allocations, packing, first calls
    hf_run(hf_model, {k: v[:4] for k, v in batch.items()}, 4)
    ours, theirs = [], []
    for rep in range(args.reps):
        res = {}
        w, c = clocks(lambda res=res: res.update(hf=hf_run(hf_model, batch, args.new_tokens)))
        theirs.append((res["hf"], w, c))
        w, c = clocks(
            lambda res=res, rep=rep: res.update(ours=r1lab_run(engine, prompts, args.new_tokens, rep))
        )
        ours.append((res["ours"], w, c))
    a, b = best_rate(ours), best_rate(theirs)
    out = {"r1lab": a, "hf": b, "speedup_cpu": round(a["cpu_tok_s"] / b["cpu_tok_s"], 2)}
    out["speedup_wall"] = round(a["wall_tok_s"] / b["wall_tok_s"], 2)
    out["packed_weights"] = engine.packed
    return out


# --------------------------------------------------------------------------- ablations


def engine_rate(engine, prompts, new_tokens, reps) -> float:
    runs = []
    for rep in range(reps):
        res = {}
        w, c = clocks(lambda res=res, rep=rep: res.update(n=r1lab_run(engine, prompts, new_tokens, rep)))
        runs.append((res["n"], w, c))
    return best_rate(runs)["cpu_tok_s"]


def sdpa_attention(q, keys, vals, mask, scale):
    b, hkv, g, d = q.shape
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv * g, 1, d), keys, vals, attn_mask=mask, scale=scale, enable_gqa=True
    )  # [B, H, 1, D]
    return out.view(b, hkv, g, d)


def ablations(preset, tok, args) -> dict:
    model = build_model(preset, tok, seed=0).eval()
    prompts = make_prompts(args.batch)
    engine = CPUEngine(model, tok)
    engine.eos_ids = frozenset()
    r1lab_run(engine, prompts[:4], 4, 0)
    out: dict = {}
    ab = {}
    # Interleave the variants rep by rep so background load hits both alike.
    variants = {
        "packed": lambda: (setattr(engine, "pack", True), engine.sync_weights()),
        "f_linear": lambda: (setattr(engine, "pack", False), engine.sync_weights()),
    }
    for _ in range(args.reps):
        for name, setup in variants.items():
            setup()
            ab.setdefault(name, []).append(engine_rate(engine, prompts, args.new_tokens, 1))
    out["pack"] = {k: max(v) for k, v in ab.items()}
    engine.pack = True
    engine.sync_weights()

    ab = {}
    for _ in range(args.reps):
        for name, on in (("native", True), ("pytorch", False)):
            engine.native = on  # the C kernels (rollout/native.py: decode, sampling) or PyTorch
            ab.setdefault(name, []).append(engine_rate(engine, prompts, args.new_tokens, 1))
    out["native"] = {k: max(v) for k, v in ab.items()}
    out["native_available"] = native.available()

    ab = {}  # PyTorch formulations of decode attention, the kernel off
    original = kernels.decode_attention
    for _ in range(args.reps):
        for name, fn in (("matmul", original), ("sdpa", sdpa_attention)):
            kernels.decode_attention = fn
            ab.setdefault(name, []).append(engine_rate(engine, prompts, args.new_tokens, 1))
    kernels.decode_attention = original
    engine.native = True
    out["attention"] = {k: max(v) for k, v in ab.items()}

    out["grad_mode"] = grad_modes(engine, args)

    threads = {}
    default = torch.get_num_threads()
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        runs = []
        for rep in range(args.reps):
            res = {}
            w, c = clocks(
                lambda res=res, rep=rep: res.update(n=r1lab_run(engine, prompts, args.new_tokens, rep))
            )
            runs.append((res["n"], w, c))
        threads[str(n)] = best_rate(runs)["wall_tok_s"]
    torch.set_num_threads(default)
    out["threads_wall_tok_s"] = threads

    out["compaction"] = compaction(engine, prompts, args)
    out["batch_cpu_tok_s"] = {
        str(b): engine_rate(engine, make_prompts(b, seed=b), args.new_tokens, max(1, args.reps - 1))
        for b in (16, 64, 128, 256)
    }
    if args.compile:
        out["compile"] = compile_ablation(engine, prompts, args)
    return out


def compaction(engine, prompts, args) -> dict:
    """Rows that stop early leave the batch: compare with decoding the whole batch every step."""
    engine.eos_ids = frozenset(range(40, 60))  # ~20 of 264 ids end a row: lengths spread out
    cpu, lengths = [], []
    for rep in range(args.reps):
        params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, seed=rep)
        res = {}
        cpu.append(
            clocks(lambda res=res, params=params: res.update(outs=engine.generate(prompts, 1, params)))[1]
        )
        lengths = [len(o.token_ids) for o in res["outs"]]
    engine.eos_ids = frozenset()
    # Without compaction every row would be decoded until the longest is done (as HF generate does).
    steps = max(lengths)
    full = min(clocks(lambda rep=rep: r1lab_run(engine, prompts, steps, rep))[1] for rep in range(args.reps))
    return {
        "tokens": sum(lengths),
        "longest": steps,
        "cpu_s_compacting": round(min(cpu), 3),
        "cpu_s_full_batch": round(full, 3),
    }


def grad_modes(engine, args) -> dict:
    """decode_step alone under inference_mode vs no_grad (weights and cache made outside both)."""
    lm = engine._backend.lm
    b, t0, steps = args.batch, 32, 16
    shape = (lm.n_layers, b, lm.n_kv_heads, t0 + steps, lm.head_dim)
    k, v = torch.zeros(shape, dtype=lm.dtype), torch.zeros(shape, dtype=lm.dtype)
    lean.ensure_rope(lm, t0 + steps)
    rates: dict[str, float] = {}
    for _ in range(args.reps):
        for name, mode in (("inference_mode", torch.inference_mode), ("no_grad", torch.no_grad)):
            tokens, pos = torch.randint(8, 100, (b,)), torch.randint(t0 // 2, t0, (b,))

            def run(tokens=tokens, pos=pos, mode=mode):
                with mode():
                    for i in range(steps):
                        kernels.decode_step(lm, k, v, tokens, pos + i, int(pos.max()) + i + 1)

            rates[name] = max(rates.get(name, 0.0), round(b * steps / clocks(run)[1], 1))
    return rates


def compile_ablation(engine, prompts, args) -> dict:
    """torch.compile of decode_step, against eager on the same (unpacked: inductor cannot read
    oneDNN's opaque packed tensors) weights."""
    engine.pack = False
    engine.sync_weights()
    eager = kernels.decode_step
    out = {"eager_cpu_tok_s": engine_rate(engine, prompts, args.new_tokens, args.reps)}
    kernels.decode_step = torch.compile(eager, dynamic=True)
    try:
        out["compile_wall_s"] = round(clocks(lambda: r1lab_run(engine, prompts[:8], 8, 0))[0], 1)
        out["compiled_cpu_tok_s"] = engine_rate(engine, prompts, args.new_tokens, args.reps)
    finally:
        kernels.decode_step = eager
        engine.pack = True
        engine.sync_weights()
    return out


def rl_shape(preset, tok, args) -> dict:
    """A GRPO-shaped call: 16 prompts x 8 samples, rows ending at different lengths.

    Twenty ids stand in for EOS so the random model stops after ~13 tokens on average (at most
    --new-tokens). HF generate expands each prompt 8 times (prefill 8x) and decodes every row until
    the longest is done; r1lab prefills each prompt once and drops finished rows. Rates count real
    completion tokens (up to and including the first stop id).
    """
    model = build_model(preset, tok, seed=0).eval()
    prompts, n, stops = make_prompts(16, seed=1), 8, list(range(40, 60))
    engine = CPUEngine(model, tok)
    engine.eos_ids = frozenset(stops)
    batch = hf_batch(tok, prompts)
    ours, theirs = [], []
    for rep in range(args.reps):
        params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, seed=rep)
        res = {}
        w, c = clocks(lambda res=res, params=params: res.update(outs=engine.generate(prompts, n, params)))
        ours.append((sum(len(o.token_ids) for o in res["outs"]), w, c))

        def hf(res=res):
            with torch.inference_mode():
                res["hf"] = model.generate(
                    **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                    max_new_tokens=args.new_tokens, eos_token_id=stops, pad_token_id=0,
                )  # fmt: skip

        w, c = clocks(hf)
        made = 0
        for row in res["hf"][:, batch["input_ids"].shape[1] :].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            made += ends[0] + 1 if ends else len(row)
        theirs.append((made, w, c))
    a, b = best_rate(ours), best_rate(theirs)
    return {"r1lab": a, "hf": b, "speedup_cpu": round(a["cpu_tok_s"] / b["cpu_tok_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="qwen2-4m,qwen2-34m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads for the head-to-head (1: CPU time is exact)"
    )
    ap.add_argument("--sections", default="head,rl,ablations", help="which parts to run: head, rl, ablations")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of decode_step (slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    report: dict = {
        "threads": args.threads,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "results": {},
    }
    report["loadavg_start"] = os.getloadavg()[0]
    sections = set(args.sections.split(","))
    for preset in args.presets.split(",") if "head" in sections else []:
        for dtype in args.dtypes.split(","):
            r = head_to_head(preset, dtype, tok, args)
            report["results"][f"{preset}/{dtype}"] = r
            print(
                f"{preset:10s} {dtype:9s} r1lab {r['r1lab']['cpu_tok_s']:8.0f} tok/s cpu ({r['r1lab']['wall_tok_s']:6.0f} wall)"
                f"  HF {r['hf']['cpu_tok_s']:8.0f} tok/s cpu ({r['hf']['wall_tok_s']:6.0f} wall)"
                f"  speedup {r['speedup_cpu']:.2f}x cpu, {r['speedup_wall']:.2f}x wall",
                flush=True,
            )
    if "rl" in sections:
        preset = args.presets.split(",")[0]
        r = report["rl_shape"] = {preset: rl_shape(preset, tok, args)}
        print(f"{preset:10s} rl-shaped (16 prompts x 8, early stops) {r[preset]}", flush=True)
    if "ablations" in sections:
        report["ablations"] = {}
        for preset in args.presets.split(","):
            a = ablations(preset, tok, args)
            report["ablations"][preset] = a
            for k, v in a.items():
                print(f"{preset:10s} ablation {k:18s} {v}", flush=True)
    report["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
