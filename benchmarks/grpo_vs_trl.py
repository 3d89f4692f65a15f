"""r1lab's GRPO step against TRL's GRPOTrainer on CPU: seconds per step, tokens/s, memory, roofline, learning.

    .venv/bin/python benchmarks/grpo_vs_trl.py            # full run (~15 min on a quiet 2-core CPU)
    .venv/bin/python benchmarks/grpo_vs_trl.py --quick    # a few steps, 4M model, short learning run
    .venv/bin/python benchmarks/grpo_vs_trl.py --no-learn --sizes qwen2-34m --steps 5 --threads 1

TRL is a benchmark-only dependency: `pip install -e '.[bench]'` into the venv.

Speed. For each size (qwen2-4m, qwen2-34m; the same random weights for every system) and dtype,
each system runs `--warmup` + `--steps` GRPO steps in a child process of its own: 8 arithmetic
prompts x G=8 completions of at most 64 tokens, exact-answer reward through `r1lab.rewards.grade`, no
KL, one AdamW step per batch, token-mean loss (TRL: `dapo`), TRL in its fastest CPU setting
(`TRL_ARGS`). Printed per system: wall and CPU seconds per step, completion tokens/s, peak RSS, the
fraction of the FLOP roofline (2N per generated and prompt token, 6N per trained token, against the
matmul peak measured at the start, by wall time and per CPU-second) and where the step's CPU time
goes. `r1lab` runs with its defaults (rows of zero advantage are left out of the update when KL is
off, `rl.skip_zero_advantage`); `r1lab-noskip` trains every row, as TRL does: the same work.
`--rounds N` runs all configurations N times in turn and keeps each one's best round; the ratio
within each round is printed too (the machine's speed drifts by more than the systems differ).

Learning. A qwen2-4m base (`r1lab pretrain`, or `--base`) is trained `--learn-steps` GRPO steps by
both systems with the same seed and prompts, in fp32 or both in bf16 (`--learn-dtype`); both
reward curves are printed and saved
(`benchmarks/results/grpo_vs_trl_rewards.{json,png}`) and `r1lab eval` scores the three models.

benchmarks/README.md explains every choice. The last line printed is one JSON object with every
figure (also saved as `benchmarks/results/grpo_vs_trl.json`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    TASK,
    Clock,
    StepTimers,
    digest,
    emit,
    loadavg,
    log,
    machine_peaks,
    peak_rss_mib,
    plot_curves,
    problems_in_order,
    prompt_lengths,
    run_child,
    run_cli,
)

SCRIPT = Path(__file__).resolve()
PROMPTS, GROUP, MAX_TOKENS = 8, 8, 64
#: r1lab-noskip: r1lab with `rl.skip_zero_advantage=false`, i.e. TRL's work (every row trained).
SYSTEMS = ("r1lab", "r1lab-noskip", "trl")


# ----------------------------------------------------------------------------- shared by the workers


def step_record(problems, plen, step: int, completion_lens: list[int], rewards: list[float]) -> dict:
    """Token counts and mean reward of one step; prompts are `problems[step*8:(step+1)*8]`."""
    idx = range(step * PROMPTS, (step + 1) * PROMPTS)
    prompt_tokens = sum(plen[i] for i in idx)
    gen = sum(completion_lens)
    return {
        "gen_tokens": gen,
        "prefill_tokens": prompt_tokens,  # each prompt read once (a group shares its prompt)
        "train_tokens": GROUP * prompt_tokens + gen,  # every sequence, prompt + completion
        "reward": statistics.fmean(rewards),
    }


# ----------------------------------------------------------------------------- workers (child processes)


#: TRL's fastest CPU setting for this workload; dtype, steps, lr and seed are added per run. TRL's
#: defaults already match r1lab's for the rest (clip 0.2, no top-p/top-k, fp32 unless bf16).
TRL_ARGS = dict(
    use_cpu=True,
    per_device_train_batch_size=PROMPTS * GROUP,  # the whole step as one micro-batch
    gradient_accumulation_steps=1,
    num_generations=GROUP,
    max_completion_length=MAX_TOKENS,
    lr_scheduler_type="constant",
    warmup_steps=0,
    adam_beta1=0.9,
    adam_beta2=0.99,
    weight_decay=0.0,
    max_grad_norm=1.0,
    beta=0.0,  # no KL: no reference model
    num_iterations=1,  # on-policy: no old-policy forward
    loss_type="dapo",  # = r1lab's token-mean
    scale_rewards="group",
    temperature=1.0,
    gradient_checkpointing=False,  # TRL turns it on by default: a second forward per step
    shuffle_dataset=False,  # the prompts come in r1lab's order
    logging_steps=10**6,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)
#: TRL's own profiled sections, under the names both systems' profiles use.
TRL_SECTIONS = {
    "GRPOTrainer.transformers.generate": "generate",
    "GRPOTrainer.transformers.generate_batch": "generate",
    "GRPOTrainer._calculate_rewards": "reward",
    "GRPOTrainer._get_per_token_logps_and_entropies": "forward",
}


def time_training_parts(timers: StepTimers) -> None:
    """Time backward, gradient clipping and the optimiser step in whichever trainer runs (class patches)."""
    import torch

    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(torch.nn.utils, "clip_grad_norm_", "clip")
    timers.wrap(torch.optim.AdamW, "step", "optimizer")


def worker_result(spec, clock: Clock, timers: StepTimers, steps: list[dict], model) -> dict:
    from r1lab.modeling import matmul_params

    wall, cpu = clock.durations()
    w, n = spec["warmup"], max(1, spec["steps"])
    profile, profile_cpu = timers.per_step(w, n), timers.per_step(w, n, cpu=True)
    profile["other"] = sum(wall[w:]) / n - sum(profile.values())
    profile_cpu["other"] = sum(cpu[w:]) / n - sum(profile_cpu.values())
    return {
        "step_times": wall,
        "step_cpu_times": cpu,
        "steps": steps,
        "n_params": matmul_params(model),
        "profile": profile,
        "profile_cpu": profile_cpu,
    }


def trl_worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from r1lab.modeling import load_model, save_checkpoint
    from r1lab.rewards import grade

    torch.set_num_threads(spec["threads"])
    n_steps = spec["warmup"] + spec["steps"]
    model, tok = load_model(spec["model"])
    problems = problems_in_order(spec["seed"], n_steps * PROMPTS, spec.get("task", TASK))
    plen = prompt_lengths(problems, tok)
    records: list[dict] = []

    def exact_answer(prompts, completions, completion_ids, pid, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        scores = [grade(t, problems[i]).score for t, i in zip(texts, pid, strict=True)]
        records.append(step_record(problems, plen, len(records), [len(c) for c in completion_ids], scores))
        return scores

    timers, clock = StepTimers(), Clock()
    # TRL times its own sections with ProfilingContext (for wandb and the like): collect them instead.
    enter = profiling.ProfilingContext.__enter__
    profiling.ProfilingContext.__enter__ = lambda self: (
        setattr(self, "c0", time.process_time()),
        enter(self),
    )[1]
    profiling.ProfilingContext._log_metrics = lambda self, d: (
        timers.add(TRL_SECTIONS[self.name], d, time.process_time() - self.c0)
        if self.name in TRL_SECTIONS
        else None
    )
    time_training_parts(timers)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.mark()
            timers.new_step()

        def on_step_end(self, args, state, control, **kw):
            clock.mark()
            timers.new_step()

    args = GRPOConfig(
        **TRL_ARGS,
        **spec.get("trl_extra", {}),
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        bf16=spec["dtype"] == "bfloat16",
        max_steps=n_steps,
        learning_rate=spec["lr"],
        seed=spec["seed"],
    )
    data = Dataset.from_list([{"prompt": p.messages, "pid": i} for i, p in enumerate(problems)])
    trainer = GRPOTrainer(model, exact_answer, args, data, processing_class=tok, callbacks=[StepClock()])
    trainer.train()
    if spec.get("save"):
        save_checkpoint(trainer.model, tok, spec["save"])
    return worker_result(spec, clock, timers, records, model)


def r1lab_worker(spec: dict) -> dict:
    from r1lab.metrics import RunDir
    from r1lab.modeling import load_model
    from r1lab.rl import grpo
    from r1lab.rl.config import GRPOConfig
    from r1lab.rollout.cpu import CPUEngine

    n_steps = spec["warmup"] + spec["steps"]
    run_dir = spec.get("run_dir") or tempfile.mkdtemp(prefix="r1lab-bench-")
    rl = {"steps": n_steps, "prompts_per_step": PROMPTS, "group_size": GROUP, "lr": spec["lr"]}
    rl.update(betas=[0.9, 0.99], max_grad_norm=1.0, loss_agg="token-mean", kl_coef=0.0)
    rl.update(precision="bf16" if spec["dtype"] == "bfloat16" else "fp32")
    cfg = {"model": spec["model"], "run_dir": run_dir, "seed": spec["seed"], "threads": spec["threads"]}
    cfg.update(task=spec.get("task", TASK), engine_dtype=spec["dtype"], samples_every=0, progress=False)
    cfg.update(sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": MAX_TOKENS})
    rl["skip_zero_advantage"] = spec.get("skip_zero_advantage", True)
    cfg = GRPOConfig.model_validate({**cfg, "rl": {**rl, **spec.get("rl_extra", {})}})
    timers, clock = StepTimers(), Clock()
    timers.wrap(CPUEngine, "sync_weights", "sync_weights")
    timers.wrap(CPUEngine, "generate", "generate")
    timers.wrap(grpo, "score", "reward")
    timers.wrap(grpo, "batch_logprobs", "forward")  # padded or packed: the training forward
    time_training_parts(timers)
    # A step ends when its metrics are logged, so it holds everything: weight sync, rollout, reward,
    # update, statistics. The first one starts at its first rollout (model loading is no part of it).
    sample, log_step = grpo.sample_groups, RunDir.log
    grpo.sample_groups = lambda *a, **k: (clock.marks or clock.mark(), timers.new_step(), sample(*a, **k))[2]
    RunDir.log = lambda self, stats: (log_step(self, stats), clock.mark())[0]
    grpo.held_out = lambda *a, **k: {}  # the end-of-run evaluation is `r1lab eval`'s job here
    grpo.train(cfg)
    model, tok = load_model(spec["model"])
    problems = problems_in_order(spec["seed"], n_steps * PROMPTS, spec.get("task", TASK))
    plen = prompt_lengths(problems, tok)
    steps = [
        step_record(problems, plen, i, [r["tokens"]], [r["reward"]])
        | {"train_tokens": r["trained_tokens"]}  # rows really trained (skipped ones excluded)
        for i, r in enumerate(RunDir(run_dir).read_metrics())
    ]
    out = worker_result(spec, clock, timers, steps, model)
    return {**out, "final_checkpoint": str(RunDir(run_dir).latest_checkpoint())}


WORKERS = {"trl": trl_worker, "r1lab": r1lab_worker}


def worker_main(spec: dict) -> None:
    result = WORKERS[spec["kind"]](spec)
    emit({**result, "peak_rss_mib": peak_rss_mib(), "loadavg": loadavg()})


# ----------------------------------------------------------------------------- the parent: speed


def best_of(per: dict, system: str, key: str = "s_per_step") -> tuple[str | None, dict | None]:
    ok = {k: v for k, v in per.items() if k.startswith(system + "/") and v.get(key)}
    if not ok:
        return None, None
    best = min(ok, key=lambda k: ok[k][key])
    return best, ok[best]


def ratios(per: dict, system: str = "r1lab") -> dict:
    """TRL's best over `system`'s best, by wall time and by CPU time (each system's better dtype)."""
    out = {}
    for key in ("s_per_step", "cpu_s_per_step"):
        (_, r1), (_, trl) = best_of(per, system, key), best_of(per, "trl", key)
        out[key] = trl[key] / r1[key] if r1 and trl else None
    return out


def print_size(size: str, per: dict, ratio: dict) -> None:
    print(f"\n{size}: {PROMPTS} prompts x G={GROUP}, <= {MAX_TOKENS} completion tokens, per GRPO step")
    cols = f"{'s/step':>7} {'median':>7} {'cpu s':>7} {'tok/s':>6} {'GFLOP/s':>7} {'roof':>6} {'roof.cpu':>8}"
    print(f"  {'system/dtype':16} {cols} {'RSS MiB':>7}  load")
    for key, d in per.items():
        if "error" in d:
            print(f"  {key:16} error: {d['error']}")
            continue
        print(
            f"  {key:16} {d['s_per_step']:7.2f} {d['median_s']:7.2f} {d['cpu_s_per_step']:7.2f} "
            f"{d['completion_tokens_per_s']:6.0f} {d['achieved_gflops']:7.2f} {d['roofline_fraction']:6.1%} "
            f"{d['cpu_roofline_fraction']:8.1%} {d['peak_rss_mib']:7.0f}  {d['loadavg_end'][0]:.1f}"
        )
    for key, d in (best_of(per, system) for system in SYSTEMS):
        prof = (d or {}).get("profile_cpu") or {}
        parts = ", ".join(f"{k} {v / d['cpu_s_per_step']:.0%}" for k, v in prof.items() if v > 0.005)
        if parts:
            print(f"  where {key}'s step goes (share of CPU time): {parts}")
    for system, r in ratio.items():
        if r["s_per_step"]:
            print(
                f"  => TRL best / {system} best: {r['s_per_step']:.2f}x by wall time, "
                f"{r['cpu_s_per_step']:.2f}x by CPU time"
            )


def speed(args, peaks: dict, cpu_peaks: dict, tmp: Path) -> dict:
    from r1lab.modeling import build_char_tokenizer, build_model, save_checkpoint

    results = {}
    for size in args.sizes:
        model_dir = tmp / size  # one set of random weights for both systems
        tok = build_char_tokenizer()
        save_checkpoint(build_model(size, tok, seed=args.seed), tok, model_dir)
        rounds = []  # each round runs every configuration once, so drifts of the machine hit all alike
        for rnd in range(args.rounds):
            per = {}
            for dtype in args.dtypes:
                for system in SYSTEMS:
                    log(
                        f"speed: {size} {system} {dtype}" + (f" (round {rnd + 1})" if args.rounds > 1 else "")
                    )
                    spec = {"kind": system.split("-")[0], "model": str(model_dir), "dtype": dtype}
                    spec.update(
                        steps=args.steps, warmup=args.warmup, seed=args.seed, lr=1e-4, threads=args.threads
                    )
                    spec.update(skip_zero_advantage=not system.endswith("-noskip"))
                    r = run_child(SCRIPT, spec, args.timeout)
                    per[f"{system}/{dtype}"] = digest(r, peaks[dtype], cpu_peaks[dtype], args.warmup)
            rounds.append(per)
        # best round of each configuration (by wall time); the ratios of each round are kept too
        per = {
            k: min((p[k] for p in rounds), key=lambda d: d.get("s_per_step") or float("inf"))
            for k in rounds[0]
        }
        ratio = {system: ratios(per, system) for system in SYSTEMS[:-1]}
        per_round = [{system: ratios(p, system) for system in SYSTEMS[:-1]} for p in rounds]
        print_size(size, per, ratio)
        if args.rounds > 1:
            for system in SYSTEMS[:-1]:
                each = [r[system]["s_per_step"] for r in per_round if r[system]["s_per_step"]]
                print(
                    f"  => TRL / {system} within each round (wall): " + ", ".join(f"{x:.2f}x" for x in each)
                )
        results[size] = {"configs": per, "trl_over_r1lab": ratio, "rounds": rounds, "round_ratios": per_round}
    return results


# ----------------------------------------------------------------------------- the parent: learning


def learning(args, tmp: Path) -> dict:
    """Pretrain a base with `r1lab pretrain`, GRPO it with both systems, evaluate all three with `r1lab eval`."""
    # sums of 1- to N-digit operands: the short ones give a fresh base some reward to start from
    task = {**TASK, "options": {"digits": args.learn_digits, "min_digits": args.learn_min_digits}}
    flow = (
        f"{{name: arithmetic, options: {{digits: {args.learn_digits}, min_digits: {args.learn_min_digits}}}"
    )
    base, n = tmp / "base", args.pretrain_steps
    if args.base:
        n = None
    else:
        log(f"learning: `r1lab pretrain` of a qwen2-4m base, {n} steps")
        argv = ["pretrain", "recipes/pretrain-arithmetic.yaml", "preset=qwen2-4m", f"out={base}"]
        argv += [f"threads={args.threads}", f"train.steps={n}", "train.batch_size=32", "progress=false"]
        argv += [f"train.warmup_steps={n // 10}", f"corpus.problems={32 * n}", f"task={flow}, split: train}}"]
        pre = run_cli(argv, args.timeout)
        if "error" in pre:
            return {"error": f"pretraining: {pre['error']}"}
    runs, finals = {}, {"base": args.base or str(base / "model")}
    for system in args.learn_systems:
        log(f"learning: {system}, {args.learn_steps} GRPO steps from the base")
        spec = {"kind": system, "model": finals["base"], "dtype": args.learn_dtype, "steps": args.learn_steps}
        spec.update(warmup=0, seed=args.seed, lr=args.learn_lr, threads=args.threads, task=task)
        spec.update(save=str(tmp / "trl-final"), run_dir=str(tmp / "r1lab-learn"))
        r = run_child(SCRIPT, spec, args.timeout)
        if "error" in r:
            runs[system] = {"error": r["error"]}
            continue
        runs[system] = {"rewards": [s["reward"] for s in r["steps"]], "seconds": sum(r["step_times"])}
        finals[system] = r.get("final_checkpoint") or spec["save"]
    held_out = {}
    for name, path in finals.items():
        log(f"learning: `r1lab eval` of {name} (greedy, {args.eval_problems} held-out problems)")
        ev = run_cli(
            ["eval", "recipes/eval-tiny.yaml", f"model={path}", f"out_dir={tmp / ('eval-' + name)}", "k=1"]
            + ["ks=[1]", "sampling.temperature=0", f"sampling.max_tokens={MAX_TOKENS}", "progress=false"]
            + [f"threads={args.threads}", f"tasks=[{flow}, split: test, limit: {args.eval_problems}}}]"],
            args.timeout,
        )
        found = re.search(r"pass@1 ([0-9.]+)", ev.get("stdout", ""))
        held_out[name] = float(found.group(1)) if found else None
    out = {
        "steps": args.learn_steps,
        "lr": args.learn_lr,
        "dtype": args.learn_dtype,
        "pretrain_steps": n,
        "task": task,
        "base": args.base,
    }
    out.update(curves=runs, held_out_pass_at_1=held_out)
    print_learning(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_vs_trl_rewards.json").write_text(json.dumps(out, indent=1))
    curves = {k: v["rewards"] for k, v in runs.items() if "rewards" in v}
    plot_curves(curves, "GRPO step", "mean reward (exact answer)", RESULTS / "grpo_vs_trl_rewards.png")
    return out


def print_learning(out: dict) -> None:
    base_name = out.get("base") or "qwen2-4m base (pretrained here)"
    print(
        f"\nlearning: {base_name}, {out['steps']} GRPO steps, lr {out['lr']}, {out['dtype']}, same seed and prompts"
    )
    for system, run in out["curves"].items():
        xs = run.get("rewards") or [float("nan")]
        k = max(1, len(xs) // 4)  # mean of the first and last quarter: single steps are noisy
        first, last = statistics.fmean(xs[:k]), statistics.fmean(xs[-k:])
        print(f"  {system:6} {run.get('error') or ' '.join(f'{x:.2f}' for x in xs)}")
        print(f"  {system:6} mean reward, first {k} steps {first:.3f} -> last {k} {last:.3f}")
    for name, acc in out["held_out_pass_at_1"].items():
        print(f"  held-out greedy pass@1 {name:6} {'-' if acc is None else f'{acc:.3f}'}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--quick", action="store_true", help="2 timed steps, qwen2-4m only, fp32, short learning run"
    )
    p.add_argument("--sizes", default="qwen2-4m,qwen2-34m")
    p.add_argument("--dtypes", default="auto", help="auto: float32, and bfloat16 where its matmuls are fast")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, interleaved; best of each",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-learn", action="store_true")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--learn-steps", type=int, default=20)
    p.add_argument("--learn-lr", type=float, default=2e-4)
    p.add_argument(
        "--learn-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="both systems' precision in the learning run (bfloat16: r1lab's bf16 engine and autocast, TRL's bf16=True)",
    )
    p.add_argument(
        "--learn-systems",
        default="r1lab,trl",
        help="who runs the learning run (r1lab alone re-measures r1lab after a change to it; TRL's curve "
        "for the same seed, dtype and flags does not change)",
    )
    p.add_argument("--learn-digits", type=int, default=2, help="operands of at most this many digits")
    p.add_argument(
        "--learn-min-digits",
        type=int,
        default=1,
        help="... and at least this many (3 and 3: the shipped base's task)",
    )
    p.add_argument("--base", help="a pretrained base checkpoint for the learning run (skips pretraining)")
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    args = p.parse_args(argv)
    args.learn_systems = [x for x in args.learn_systems.split(",") if x]
    if unknown := set(args.learn_systems) - {"r1lab", "trl"}:
        p.error(f"--learn-systems: unknown {', '.join(sorted(unknown))} (r1lab, trl)")
    if args.quick:
        args.sizes, args.dtypes, args.steps = "qwen2-4m", "float32", 2
        args.pretrain_steps, args.learn_steps, args.eval_problems = 60, 4, 50
    args.sizes = args.sizes.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    import trl

    t0 = time.perf_counter()
    load_start = loadavg()
    log(f"measuring the matmul peak (float32, bfloat16; {args.threads} threads)")
    peaks, cpu_peaks, skipped = machine_peaks(args)
    result = {"benchmark": "grpo_vs_trl", "trl_version": trl.__version__, "threads": args.threads}
    result.update(loadavg_start=load_start, matmul_peak_flops=peaks, matmul_flops_per_cpu_s=cpu_peaks)
    result.update(dtypes=args.dtypes, dtypes_note=skipped, quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as tmp:
        if not args.no_speed:
            result["speed"] = speed(args, peaks, cpu_peaks, Path(tmp))
        if not args.no_learn:
            result["learning"] = learning(args, Path(tmp))
    result["loadavg_end"], result["seconds"] = loadavg(), time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_vs_trl.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"\nload average at the end {result['loadavg_end']}; {result['seconds'] / 60:.1f} min in all")
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
