"""r1lab's GRPO training throughput (forward + backward + optimiser) against this machine's matmul peak.

    .venv/bin/python benchmarks/train_throughput.py                 # both sizes, fp32 (+ bf16 if native)
    .venv/bin/python benchmarks/train_throughput.py --quick         # qwen2-4m, fp32, 2 timed updates
    .venv/bin/python benchmarks/train_throughput.py --dtypes float32,bfloat16 --rows 64,256 --threads 1

What is timed is the trainer's own update, `r1lab.rl.grpo.policy_update`: the rollouts of one GRPO
step (rows of prompt + completion tokens with an advantage each) are bucketed by length into
micro-batches of at most `micro_batch_tokens` padded tokens (each value of `--micro-batch-tokens`;
2048 is r1lab's default since this benchmark measured it fastest here; every row is trained,
`rl.skip_zero_advantage` off), and each micro-batch goes through the forward pass, per-token log-probs,
the clipped GRPO loss and the backward pass; then gradient clipping and one AdamW step. The rows
imitate a GRPO step on the arithmetic task: its chat-template prompts and completion lengths drawn
uniformly from 8 to 64 tokens.

Paths: `r1lab` is the trainer's defaults (packed sequences, and r1lab's own forward of
`modeling/fused.py` for Qwen2/Llama models on CPU); `r1lab-hf` the same update through Hugging Face's
forward on the packed rows (the gap is what the own forward wins); `r1lab-pad` right-padded
micro-batches (`rl.pack_sequences` off). For contrast, `model-only` times the same model on the same padded batches with a plain next-token
cross-entropy (HF forward + loss + backward + AdamW, nothing of r1lab): the gap between the two
rows is what r1lab's loss path costs; the gap between `model-only` and 100% is the model's own.

Throughput = trained tokens per second (real tokens; `w/ pad` counts the padded tokens the kernels
ran); FLOPs = 6N per trained token (N = `matmul_params`) against `measure_matmul_peak` for the dtype
(bf16 = autocast), and per CPU-second against the matmul's FLOPs per CPU-second (`per cpu`: the
figure to read on a shared machine, with `--threads 1`). `of local` divides by the peak measured in
the same child right before and after its timed updates (the faster of the two; `local`, GFLOP/s):
the machine's speed drifts from minute to minute on shared hosts, so this is the figure that
compares the update with the matmul peak of the same moment. Each configuration runs in a child
process of its own. The last line printed is one JSON object (also `benchmarks/results/train_throughput.json`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    Clock,
    StepTimers,
    emit,
    loadavg,
    log,
    machine_peaks,
    peak_rss_mib,
    problems_in_order,
    run_child,
)

SCRIPT = Path(__file__).resolve()
MAX_TOKENS = 64


def grpo_rows(tokenizer, n: int, seed: int):
    """n rollouts shaped like a GRPO step on the arithmetic task: real prompts, 8..64 completion tokens."""
    from r1lab.rl.grpo import Rollout

    rng = random.Random(seed)
    problems = problems_in_order(seed, n)
    rows = []
    for p in problems:
        text = tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        completion = [rng.randrange(8, 200) for _ in range(rng.randint(8, MAX_TOKENS))]  # byte tokens
        rows.append(
            Rollout(prompt + completion, len(prompt), rng.choice([-1.0, 1.0]), [0.0] * len(completion))
        )
    return rows


def kernel_tokens(rows, budget: int, pack: bool, fused: bool = False) -> int:
    """Tokens the matmuls run on in one update, padding included (rows x width of each micro-batch;
    r1lab's own forward runs them on the real tokens only)."""
    from r1lab.modeling.packing import pack_rows
    from r1lab.rl import grpo

    if fused:
        return sum(len(r.ids) for r in rows)
    total = 0
    for mb in grpo.micro_batches(rows, budget, pack):
        lengths = [len(r.ids) for r in mb]
        if not pack:
            total += len(mb) * max(lengths)
            continue
        layout = pack_rows(lengths, range(len(mb)), max(lengths))  # as grpo.batch_logprobs packs
        total += len(layout) * max(sum(lengths[i] for i in row) for row in layout)
    return total


def worker(spec: dict) -> dict:
    import torch

    from r1lab.metrics.cost import measure_matmul_peak
    from r1lab.modeling import build_char_tokenizer, build_model, matmul_params
    from r1lab.modeling.onednn import use_onednn_linears
    from r1lab.modeling.train_state import make_optimizer, make_scheduler
    from r1lab.rl import grpo
    from r1lab.rl.config import GRPOConfig

    torch.set_num_threads(spec["threads"])
    tok = build_char_tokenizer()
    model = build_model(spec["size"], tok, seed=0).train()
    if spec["path"] != "model-only":
        use_onednn_linears(model)  # as the trainers do (fp32 on CPU, where oneDNN wins)
    rows = grpo_rows(tok, spec["rows"], seed=0)
    bf16 = spec["dtype"] == "bfloat16"
    cfg = GRPOConfig.model_validate(
        {
            "model": "unused",
            "sampling": {"max_tokens": MAX_TOKENS},
            "rl": {
                "precision": "bf16" if bf16 else "fp32",
                "micro_batch_tokens": spec["micro_batch_tokens"],
                "pack_sequences": spec["path"] in ("r1lab", "r1lab-hf"),
                "skip_zero_advantage": False,  # throughput of the update itself: every row trained
            },
        }
    )
    if spec.get("compile"):  # an experiment, not a trainer option: see benchmarks/README.md
        model.forward = torch.compile(model.forward, dynamic=True)  # compiled in the warm-up updates
    timers = StepTimers()  # wrapped before the optimiser exists: the scheduler binds its step method
    timers.wrap(type(model), "forward", "model_forward")
    timers.wrap(grpo, "batch_logprobs", "forward_and_logprobs")
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(torch.optim.AdamW, "step", "optimizer")
    opt = make_optimizer(model, 1e-5, 0.0, (0.9, 0.99))
    sched = make_scheduler(opt, "constant", 0, 10**6)
    batches = grpo.micro_batches(rows, spec["micro_batch_tokens"])  # padded (model-only runs these)
    from r1lab.modeling import fused

    if spec["path"] == "r1lab-hf":
        fused.disable(model)  # packed, through HF's own forward
    own = spec["path"] == "r1lab" and fused.supported(model)
    padded = kernel_tokens(rows, spec["micro_batch_tokens"], spec["path"] in ("r1lab", "r1lab-hf"), own)

    def model_only() -> None:
        for mb in batches:
            ids, attn, _ = grpo.collate(mb, tok.pad_token_id)  # [b, L] each
            labels = ids.masked_fill(attn == 0, -100)  # [b, L]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def r1lab_update() -> None:
        grpo.policy_update(model, None, opt, sched, rows, cfg, tok.pad_token_id, random.Random(0))

    step = model_only if spec["path"] == "model-only" else r1lab_update
    # The machine's speed drifts (shared hosts): the peak is also measured in this process just
    # before and after the timed updates, and the faster of the two is this row's `local` peak.
    local_peaks = [measure_matmul_peak(spec["dtype"], 1.0)]
    clock = Clock()
    for _ in range(spec["warmup"] + spec["iters"]):
        timers.new_step()
        clock.mark()
        step()
    clock.mark()
    local_peaks.append(measure_matmul_peak(spec["dtype"], 1.0))
    wall, cpu = (x[spec["warmup"] :] for x in clock.durations())
    tokens = sum(len(r.ids) for r in rows)
    return {
        "seconds_per_update": sum(wall) / len(wall),
        "cpu_seconds_per_update": sum(cpu) / len(cpu),
        "tokens": tokens,
        "padded_tokens": padded,
        "local_peak_flops": max(local_peaks),
        "micro_batches": len(batches),
        "own_forward": own,
        "n_params": matmul_params(model),
        "profile": timers.per_step(spec["warmup"], spec["iters"]),
        "profile_cpu": timers.per_step(spec["warmup"], spec["iters"], cpu=True),
    }


def run_all(args) -> dict:
    peaks, cpu_peaks, skipped = machine_peaks(args)
    print(
        f"{'size':10} {'dtype':9} {'path':10} {'rows':>4} {'mb tok':>6} {'pad%':>4} {'s/upd':>6} {'cpu s':>6} {'tok/s':>6} "
        f"{'GFLOP/s':>7} {'of peak':>7} {'w/ pad':>6} {'per cpu':>7} {'of local':>8} {'local':>5}  load"
    )
    configs = []
    for size, dtype, n_rows in itertools.product(args.sizes, args.dtypes, args.rows):
        # r1lab's update (packed, then padded) at each micro-batch budget, then the bare model at the
        # first budget (r1lab's default)
        paths = ("r1lab", "r1lab-hf", "r1lab-pad")
        runs = [(path, mbt) for mbt in args.micro_batch_tokens for path in paths]
        runs = [(p, m) for p, m in runs if p in args.paths]
        if "model-only" in args.paths:
            runs.append(("model-only", args.micro_batch_tokens[0]))
        for path, mbt in runs:
            spec = {"size": size, "dtype": dtype, "rows": n_rows, "path": path, "micro_batch_tokens": mbt}
            spec.update(threads=args.threads, warmup=args.warmup, iters=args.iters, compile=args.compile)
            log(f"throughput: {size} {dtype} {n_rows} rows {path} micro-batch {mbt} tokens")
            r = run_child(SCRIPT, spec, args.timeout)
            configs.append(digest(spec, r, peaks[dtype], cpu_peaks[dtype]))
    return {"matmul_peak_flops": peaks, "matmul_flops_per_cpu_s": cpu_peaks, "configs": configs}


def digest(spec: dict, r: dict, peak: float, cpu_peak: float) -> dict:
    out = {k: spec[k] for k in ("size", "dtype", "rows", "path", "micro_batch_tokens")}
    out["compile"] = bool(spec.get("compile"))
    label = spec["path"] + ("+compile" if out["compile"] else "")
    if "error" in r:
        print(f"{spec['size']:10} {spec['dtype']:9} {label:10} error: {r['error']}")
        return {**out, "error": r["error"]}
    s = r["seconds_per_update"]
    flops = 6 * r["n_params"] * r["tokens"]
    out.update(
        seconds_per_update=s,
        tokens_per_s=r["tokens"] / s,
        achieved_gflops=flops / s / 1e9,
        fraction_of_peak=flops / s / peak,
        local_peak_flops=r["local_peak_flops"],
        fraction_of_local_peak=flops / s / r["local_peak_flops"],
        cpu_seconds_per_update=r["cpu_seconds_per_update"],
        cpu_fraction_of_peak=flops / r["cpu_seconds_per_update"] / cpu_peak,
        padding_fraction=1 - r["tokens"] / r["padded_tokens"],
        # what the kernels ran at, padding included: the part of the gap that packing cannot close
        padded_fraction_of_peak=6 * r["n_params"] * r["padded_tokens"] / s / peak,
        micro_batches=r["micro_batches"],
        own_forward=r["own_forward"],
        peak_rss_mib=r["peak_rss_mib"],
        loadavg=r["loadavg"],
        profile=r["profile"],
        profile_cpu=r["profile_cpu"],
    )
    print(
        f"{spec['size']:10} {spec['dtype']:9} {label:10} {spec['rows']:4d} {spec['micro_batch_tokens']:6d} "
        f"{out['padding_fraction']:4.0%} "
        f"{s:6.2f} {out['cpu_seconds_per_update']:6.2f} {out['tokens_per_s']:6.0f} {out['achieved_gflops']:7.2f} "
        f"{out['fraction_of_peak']:7.1%} {out['padded_fraction_of_peak']:6.1%} {out['cpu_fraction_of_peak']:7.1%} "
        f"{out['fraction_of_local_peak']:8.1%} {r['local_peak_flops'] / 1e9:5.0f}  {r['loadavg'][0]:.1f}"
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default="qwen2-4m,qwen2-34m")
    p.add_argument("--dtypes", default="auto", help="auto: float32, and bfloat16 where its matmuls are fast")
    p.add_argument("--rows", default="64", help="rollouts per update, e.g. 64,256 (8 prompts x 8 = 64)")
    p.add_argument("--iters", type=int, default=3, help="timed updates per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--micro-batch-tokens",
        default="16384,2048",
        help="rl.micro_batch_tokens values (2048: r1lab's default)",
    )
    p.add_argument(
        "--paths",
        default="r1lab,r1lab-hf,r1lab-pad,model-only",
        help="r1lab (the defaults: packed sequences, r1lab's own forward where supported), r1lab-hf "
        "(packed, HF's forward), r1lab-pad (rl.pack_sequences=false), model-only",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model's forward (dynamic shapes); the compile falls in the warm-up updates",
    )
    p.add_argument("--timeout", type=float, default=1200)
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured
    if args.worker:
        spec = json.loads(args.worker)
        emit({**worker(spec), "peak_rss_mib": peak_rss_mib(), "loadavg": loadavg()})
        return 0
    if args.quick:
        args.sizes, args.dtypes, args.rows, args.iters = "qwen2-4m", "float32", "64", 2
    args.sizes = args.sizes.split(",")
    args.paths = args.paths.split(",")
    args.rows = [int(x) for x in args.rows.split(",")]
    args.micro_batch_tokens = [int(x) for x in args.micro_batch_tokens.split(",")]
    t0, load_start = time.perf_counter(), loadavg()
    result = {
        "benchmark": "train_throughput",
        "threads": args.threads,
        "loadavg_start": load_start,
        **run_all(args),
    }
    result["loadavg_end"], result["seconds"] = loadavg(), time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=1, default=float))
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
