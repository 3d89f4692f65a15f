"""`r1lab estimate RECIPE [key=value ...]`: FLOPs, wall time and dollars of a recipe, before running it.

    r1lab estimate recipes/grpo-arithmetic.yaml                 here vs an H100 at MFU 0.4
    r1lab estimate recipes/grpo-gsm8k-qwen2.5-0.5b.yaml --gpu A100 --gpus 8 --price-per-hour 1.5
    r1lab estimate recipes/eval-gsm8k-qwen.yaml --run-dir runs/eval-gsm8k   (writes estimate.json)

What the recipe is decides what is counted (see `r1lab.metrics.cost` for the FLOP model):

* GRPO (`rl:` section or `stage: grpo`; fields of `r1lab.rl.config.GRPOConfig`): `rl.steps` x
  `rl.prompts_per_step` x `rl.group_size` completions, trained on for `rl.epochs` passes, plus a
  reference forward when `rl.kl_coef > 0`, an old-policy forward when `rl.epochs > 1` and
  `rl.old_logp: recompute`, and the held-out evaluations (`eval_problems` x `eval_k`, every
  `eval_every` steps or once at the end).
* Evaluation (`tasks:` or `stage: eval`; `r1lab.eval.config.EvalConfig`): problems x k completions.
* SFT (`stage: sft`; `r1lab.sft.config.SFTConfig`): the tokens of every conversation in `data`
  (chat JSONL), `epochs` times or `max_steps` x `batch_size` conversations, whichever is fewer.

*Here* assumes the utilisation of `r1lab.metrics.cost` for large models; a model of at most 50M
parameters (a tiny preset, a local checkpoint) is timed instead (`--calibrate`, seconds): one batch
of completions with the CPU engine and a few training steps, because small models spend most of
their time outside matmuls and would otherwise be estimated orders of magnitude too fast.

Completions are counted at `sampling.max_tokens` each (an upper bound: every completion runs to the
limit) unless `--fill` says what fraction of it they use on average. N is the model's matmul
parameters (see `model_params`), from its config.json or tiny preset, or `--params`. Prompt length is
measured with the model's tokenizer on up to 64 of the task's problems, or `--prompt-tokens`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from r1lab.config import R1labError, add_recipe_arguments, read_yaml, recipe_and_overrides
from r1lab.metrics import cost

PROMPT_SAMPLE = 64  # problems tokenised to measure the mean prompt length
CALIBRATE_MAX_PARAMS = 50e6  # --calibrate auto times models up to this size (seconds for them)


class EstimateError(R1labError):
    """A recipe whose cost cannot be estimated (unknown kind, model size unknown)."""


def add_arguments(parser) -> None:
    add_recipe_arguments(parser, required=True)
    parser.add_argument(
        "--gpu", default="H100", help=f"GPU to price: {', '.join(cost.GPU_SPECS)} (default H100)"
    )
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (ideal scaling)")
    parser.add_argument("--mfu", type=float, default=cost.DEFAULT_MFU, help="training MFU on the GPU")
    parser.add_argument(
        "--gen-mfu", type=float, default=cost.DEFAULT_GEN_MFU, help="generation MFU on the GPU"
    )
    parser.add_argument(
        "--price-per-hour", type=float, default=None, help="US$ per GPU-hour (default: typical)"
    )
    parser.add_argument(
        "--local-price-per-hour", type=float, default=0.0, help="US$ per hour of this machine"
    )
    parser.add_argument(
        "--params", type=float, default=None, help="model parameters (default: from the checkpoint)"
    )
    parser.add_argument(
        "--prompt-tokens", type=float, default=None, help="mean prompt tokens (default: measured)"
    )
    parser.add_argument(
        "--fill", type=float, default=1.0, help="mean completion length / max_tokens (default 1)"
    )
    parser.add_argument(
        "--peak", type=float, default=None, help="this machine's matmul FLOP/s (default: measured)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent measuring the matmul peak")
    parser.add_argument("--run-dir", default=None, help="write estimate.json into this run directory")
    parser.add_argument(
        "--calibrate", choices=["auto", "on", "off"], default="auto",
        help="time the model itself here instead of assuming utilisation (auto: models up to 50M parameters)",
    )  # fmt: skip


# --------------------------------------------------------------------------- recipe facts


def recipe_kind(data: dict, where: str) -> str:
    """grpo, eval or sft, from an explicit `stage:` key or the sections present.

    >>> recipe_kind({"model": "m", "rl": {"steps": 3}}, "r.yaml"), recipe_kind({"stage": "eval"}, "r.yaml")
    ('grpo', 'eval')
    """
    stage = data.get("stage")
    if stage in ("grpo", "eval", "sft"):
        return stage
    if stage is not None:
        raise EstimateError(f"{where}: stage {stage!r}: only grpo, eval and sft recipes are estimated")
    for key, kind in (("rl", "grpo"), ("tasks", "eval")):
        if key in data:
            return kind
    raise EstimateError(
        f"{where}: cannot tell the recipe's kind: add 'stage: grpo|eval|sft' or an rl/tasks section"
    )


def model_params(model: str | None, override: float | None, where: str) -> float:
    """N for the FLOP count: `--params`, else the matmul parameters of the checkpoint or tiny preset.

    Matmul parameters (`r1lab.modeling.matmul_params`: all but the embedding tables, plus the output
    projection even when tied) are the N the training loops log FLOPs with, so an estimate and the
    run's actual FLOPs compare like for like. The model is built on the meta device (shapes only).
    Without a readable config.json, the safetensors headers' total is the fallback.
    """
    if override is not None:
        return override
    if model:
        path = Path(model)
        if (path / "config.json").is_file():
            from transformers import AutoConfig

            try:
                return float(_matmul_params(AutoConfig.from_pretrained(path, local_files_only=True)))
            except (OSError, ValueError, KeyError):
                pass  # an architecture transformers cannot build: count the stored tensors instead
        if path.is_dir():
            n = cost.count_checkpoint_params(path)
            if n is not None:
                return float(n)
        elif "/" not in model:  # preset names have no slash; skip importing transformers for paths
            from r1lab.modeling import PRESETS, build_char_tokenizer, preset_config

            if model in PRESETS:
                return float(_matmul_params(preset_config(model, build_char_tokenizer())))
    raise EstimateError(
        f"{where}: model {model!r}: no checkpoint with a config or safetensors there; pass --params N"
    )


def _matmul_params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from r1lab.modeling import matmul_params

    with torch.device("meta"):  # shapes only, no memory
        return matmul_params(AutoModelForCausalLM.from_config(config))


def _tokenizer_of(model: str | None):
    """The tokenizer of a checkpoint directory, the character tokenizer of a tiny preset, or None."""
    if not model:
        return None
    if (Path(model) / "config.json").is_file():
        from r1lab.modeling import load_tokenizer

        return load_tokenizer(model)
    from r1lab.modeling import PRESETS, build_char_tokenizer

    return build_char_tokenizer() if model in PRESETS else None


def _ids(rendered) -> list[int]:
    """Token ids from apply_chat_template, which returns a list or (transformers 5) a BatchEncoding."""
    return rendered["input_ids"] if hasattr(rendered, "keys") else rendered


def prompt_tokens(model: str | None, task_spec, override: float | None) -> tuple[float, str]:
    """Mean prompt length in tokens, and how it was obtained."""
    if override is not None:
        return override, "given"
    from r1lab.tasks import load_task

    problems = load_task(task_spec.model_copy(update={"limit": PROMPT_SAMPLE}))[:PROMPT_SAMPLE]
    if not problems:
        raise EstimateError(f"task {task_spec.name!r} has no problems")
    tok = _tokenizer_of(model)
    if tok is not None and tok.chat_template:
        lengths = [
            len(_ids(tok.apply_chat_template(p.messages, add_generation_prompt=True))) for p in problems
        ]
        return sum(lengths) / len(lengths), f"measured on {len(problems)} problems"
    chars = sum(sum(len(m["content"]) for m in p.messages) for p in problems) / len(problems)
    return chars / 4, f"~chars/4 on {len(problems)} problems (no tokenizer with a chat template)"


# --------------------------------------------------------------------------- workloads per kind


def grpo_work(recipe: str, overrides: list[str], args) -> tuple[cost.Workload, dict]:
    from r1lab.config import load_config
    from r1lab.rl.config import GRPOConfig

    cfg = load_config(GRPOConfig, recipe, overrides)
    n = model_params(cfg.model, args.params, recipe)
    ptok, how = prompt_tokens(cfg.model, cfg.task, args.prompt_tokens)
    ctok = cfg.sampling.max_tokens * args.fill
    rl = cfg.rl
    work = cost.grpo_workload(
        n, rl.steps, rl.prompts_per_step, rl.group_size, ptok, ctok, epochs=rl.epochs,
        reference=rl.kl_coef > 0, recompute_old_logp=rl.old_logp == "recompute",
    )  # fmt: skip
    n_evals = max(1, rl.steps // cfg.eval_every) if cfg.eval_every else 1
    work = work + cost.eval_workload(n, cfg.eval_problems * n_evals, cfg.eval_k, ptok, ctok)
    from r1lab.modeling.train_state import use_bf16

    dtypes = {"gen": cfg.engine_dtype, "train": "bfloat16" if use_bf16(rl.precision) else "float32"}
    facts = {"kind": "grpo", "model": cfg.model, "model_ref": cfg.model, "prompt_tokens": ptok, "prompt_tokens_source": how,
             "completion_tokens": ctok, "evaluations": n_evals, "dtypes": dtypes,
             "batch": {"rows": rl.prompts_per_step * rl.group_size, "seq_tokens": ptok + ctok}}  # fmt: skip
    return work, facts


def eval_work(recipe: str, overrides: list[str], args) -> tuple[cost.Workload, dict]:
    from r1lab.config import load_config
    from r1lab.eval.config import EvalConfig
    from r1lab.tasks import load_task

    cfg = load_config(EvalConfig, recipe, overrides)
    n = model_params(cfg.model.path, args.params, recipe)
    ctok = cfg.sampling.max_tokens * args.fill
    work = cost.Workload(n)
    counts, ptok = [], 0.0
    for spec in cfg.tasks:
        if cfg.limit is not None:
            spec = spec.model_copy(update={"limit": min(cfg.limit, spec.limit or cfg.limit)})
        problems = len(load_task(spec))
        ptok, how = prompt_tokens(cfg.model.path, spec, args.prompt_tokens)
        work = work + cost.eval_workload(n, problems, cfg.k, ptok, ctok)
        counts.append(
            {"task": spec.name, "problems": problems, "prompt_tokens": ptok, "prompt_tokens_source": how}
        )
    facts = {"kind": "eval", "model": cfg.model.describe(), "model_ref": cfg.model.path, "k": cfg.k, "tasks": counts,
             "completion_tokens": ctok, "dtypes": {"gen": cfg.model.dtype},
             "batch": {"rows": cfg.batch_prompts * cfg.k, "seq_tokens": ptok + ctok}}  # fmt: skip
    return work, facts


def _conversations(path: Path) -> list[list[dict]]:
    """The `messages` of every row of a chat JSONL (what SFT trains on)."""
    if not path.is_file():
        raise EstimateError(f"{path}: no such data file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise EstimateError(f"{path}:{i}: not JSON") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
                raise EstimateError(f"{path}:{i}: field 'messages': expected a list of chat messages")
            out.append(msgs)
    return out


def sft_work(recipe: str, overrides: list[str], args) -> tuple[cost.Workload, dict]:
    """SFT: every conversation's tokens through forward and backward, `epochs` times (or max_steps)."""
    from r1lab.config import load_config
    from r1lab.sft.config import SFTConfig

    cfg = load_config(SFTConfig, recipe, overrides)
    n = model_params(cfg.model, args.params, recipe)
    if not cfg.data:
        raise EstimateError(f"{recipe}: field 'data': no JSONL files to count tokens in")
    convs = [c for path in cfg.data for c in _conversations(Path(path))]
    if not convs:
        raise EstimateError(f"{recipe}: the data files hold no conversations")
    sample = convs[:PROMPT_SAMPLE]
    tok = _tokenizer_of(cfg.model)
    if tok is not None and tok.chat_template:
        per_conv = sum(len(_ids(tok.apply_chat_template(c))) for c in sample) / len(sample)
        how = f"measured on {len(sample)} conversations"
    else:
        per_conv = sum(len(str(m.get("content", ""))) for c in sample for m in c) / len(sample) / 4
        how = f"~chars/4 on {len(sample)} conversations"
    seen = len(convs) * cfg.epochs
    if cfg.max_steps is not None:
        seen = min(seen, cfg.max_steps * cfg.batch_size)
    work = cost.sft_workload(n, per_conv * seen, epochs=1)
    dtype = "bfloat16" if cfg.autocast_bf16 else "float32"
    facts = {"kind": "sft", "model": cfg.model, "model_ref": cfg.model, "conversations": len(convs), "conversations_trained": seen,
             "tokens_per_conversation": per_conv, "tokens_source": how, "dtypes": {"train": dtype},
             "batch": {"rows": cfg.batch_size, "seq_tokens": per_conv}}  # fmt: skip
    return work, facts


# --------------------------------------------------------------------------- calibration


def _local_model(model: str | None) -> str | None:
    """The model if it can be loaded here for calibration (a checkpoint directory or a tiny preset)."""
    if not model:
        return None
    if (Path(model) / "config.json").is_file():
        return model
    if "/" not in model:
        from r1lab.modeling import PRESETS

        return model if model in PRESETS else None
    return None


def calibrate(model: str, batch: dict, dtypes: dict) -> dict:
    """Time the model itself here: one batch of completions with the CPU engine, and a few training
    forward+backward passes. Small models spend most of their time outside matmuls (Python, kernel
    launches, sampling), so their achieved FLOP/s is far below the matmul peak; this measures it.

    The batch is the recipe's (rows sampled at once, capped at 256); completions are cut at 32 tokens
    and training rows at 32 x 256 tokens, so calibration takes seconds.
    """
    import torch

    from r1lab.modeling import build_char_tokenizer, build_model, load_model, matmul_params
    from r1lab.rollout import CPUEngine, SamplingParams

    if (Path(model) / "config.json").is_file():
        net, tok = load_model(model, "float32")
    else:
        tok = build_char_tokenizer()
        net = build_model(model, tok, seed=0)
    n = matmul_params(net)
    rows = int(min(max(batch["rows"], 1), 256))
    engine = CPUEngine(net, tok, dtype=dtypes.get("gen", "float32"), seed=0)
    prompt = [{"role": "user", "content": "123+456"}]
    engine.generate([prompt], 2, SamplingParams(max_tokens=2))  # warm-up: first-call allocations
    t0 = time.perf_counter()
    outs = engine.generate([prompt], rows, SamplingParams(temperature=1.0, max_tokens=32, seed=0))
    gen_s = time.perf_counter() - t0
    gen_tokens = sum(len(c.token_ids) for c in outs)

    b, t = min(rows, 32), int(min(max(batch["seq_tokens"], 8), 256))
    ids = torch.randint(0, len(tok), (b, t))  # [b, t]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtypes.get("train") == "bfloat16")
    net.train()
    best = float("inf")
    for _ in range(3):  # the first pass pays for allocations; keep the best of the rest
        t0 = time.perf_counter()
        with autocast:
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        net.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - t0)
    return {
        "gen_flops_per_s": 2 * n * gen_tokens / gen_s,
        "gen_tokens_per_s": gen_tokens / gen_s,
        "train_flops_per_s": 6 * n * b * t / best,
        "train_tokens_per_s": b * t / best,
        "rows": rows,
    }


# --------------------------------------------------------------------------- the command


def estimate_recipe(recipe: str, overrides: list[str], args) -> dict:
    """The estimate of a recipe as a JSON-ready dict (what `estimate.json` holds)."""
    kind = recipe_kind(read_yaml(recipe), recipe)
    work, facts = {"grpo": grpo_work, "eval": eval_work, "sft": sft_work}[kind](recipe, overrides, args)
    try:
        gpu = cost.gpu_spec(args.gpu)
    except KeyError as e:
        raise EstimateError(f"--gpu: {e.args[0]}") from None
    if args.gpus < 1 or not 0 < args.fill <= 1:
        raise EstimateError("--gpus must be >= 1 and --fill in (0, 1]")
    measured: dict[str, float] = {}  # dtype -> FLOP/s, each dtype measured once
    peaks = {}
    for phase, dtype in facts["dtypes"].items():
        if args.peak is None and dtype not in measured:
            measured[dtype] = cost.measure_matmul_peak(dtype, args.seconds)
        peaks[phase] = args.peak if args.peak is not None else measured[dtype]
    fractions = {"gen_fraction": cost.DEFAULT_GEN_FRACTION, "train_fraction": cost.DEFAULT_TRAIN_FRACTION}
    if args.calibrate == "on" or (args.calibrate == "auto" and work.n_params <= CALIBRATE_MAX_PARAMS):
        local = _local_model(facts.pop("model_ref"))
        if local is None:
            if args.calibrate == "on":
                raise EstimateError(
                    f"{recipe}: --calibrate on needs a local checkpoint or a tiny preset as the model"
                )
        else:
            facts["calibration"] = calibrate(local, facts["batch"], facts["dtypes"])
            for phase, key in (("gen", "gen_fraction"), ("train", "train_fraction")):
                rate = facts["calibration"][f"{phase}_flops_per_s"]
                peak = peaks.get(phase) or peaks.get("gen") or peaks["train"]
                # clamped: a busy machine can under-measure the peak; a model that stops at once, the rate
                fractions[key] = min(1.0, max(rate / peak, 1e-6))
    try:
        out = cost.estimate(
            work, peaks.get("gen") or peaks["train"], gpu, **fractions, mfu=args.mfu, gen_mfu=args.gen_mfu, price_per_hour=args.price_per_hour,
            n_gpus=args.gpus, local_price_per_hour=args.local_price_per_hour, here_train_peak=peaks.get("train"),
        )  # fmt: skip
    except ValueError as e:
        raise EstimateError(str(e)) from None
    facts.pop("model_ref", None)
    out.update(recipe=str(recipe), **facts)
    return out


def table_rows(est: dict) -> list[tuple[str, str, str]]:
    """(quantity, here, on the GPU) rows of the printed table."""
    w, here, gpu = est["workload"], est["here"], est["gpu"]
    same = lambda text: (text, text)  # noqa: E731  (a fact that does not depend on the machine)
    rows = [
        ("parameters", *same(cost.fmt_si(w["n_params"]))),
        ("tokens generated", *same(cost.fmt_si(w["gen_tokens"]))),
        ("prompt tokens read by the sampler", *same(cost.fmt_si(w["prefill_tokens"]))),
        ("tokens trained (x epochs)", *same(cost.fmt_si(w["train_tokens"]))),
        ("extra forward tokens (ref / old policy)", *same(cost.fmt_si(w["extra_forward_tokens"]))),
        ("FLOPs generation", *same(cost.fmt_si(est["flops"]["generation"], "FLOP"))),
        ("FLOPs training", *same(cost.fmt_si(est["flops"]["training"], "FLOP"))),
        ("FLOPs total", *same(cost.fmt_si(est["flops"]["total"], "FLOP"))),
        ("peak FLOP/s", cost.fmt_si(here["peak_flops"], "FLOP/s"), cost.fmt_si(gpu["peak_flops"] * gpu["n_gpus"], "FLOP/s")),
        ("utilisation gen / train", f"{here['gen_fraction']:.2f} / {here['train_fraction']:.2f}",
         f"{gpu['gen_mfu']:.2f} / {gpu['mfu']:.2f}"),
        ("wall time generation", cost.fmt_duration(here["gen_seconds"]), cost.fmt_duration(gpu["gen_seconds"])),
        ("wall time training", cost.fmt_duration(here["train_seconds"]), cost.fmt_duration(gpu["train_seconds"])),
        ("wall time total", cost.fmt_duration(here["seconds"]), cost.fmt_duration(gpu["seconds"])),
        ("price per hour", cost.fmt_dollars(here["price_per_hour"]), cost.fmt_dollars(gpu["price_per_hour"])),
        ("cost", cost.fmt_dollars(here["dollars"]), cost.fmt_dollars(gpu["dollars"])),
        ("$ / M generated tokens", cost.fmt_dollars(here["dollars_per_million_generated"]),
         cost.fmt_dollars(gpu["dollars_per_million_generated"])),
    ]  # fmt: skip
    return rows


def print_estimate(est: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gpu = est["gpu"]
    table = Table(title=f"r1lab estimate: {est['recipe']} ({est['kind']}, model {est['model']})")
    table.add_column("")
    table.add_column("here (measured peak)", justify="right")
    table.add_column(f"{gpu['n_gpus']} x {gpu['gpu']}", justify="right")
    for row in table_rows(est):
        table.add_row(*row)
    console = Console()
    console.print(table)
    notes = (
        [f"completions counted at {est['completion_tokens']:.0f} tokens"]
        if "completion_tokens" in est
        else []
    )
    if "prompt_tokens" in est:
        notes.append(f"prompts {est['prompt_tokens']:.0f} tokens ({est['prompt_tokens_source']})")
    cal = est.get("calibration")
    if cal:
        notes.append(
            f"here: this model measured at {cal['gen_tokens_per_s']:,.0f} tok/s generating ({cal['rows']} rows at once)"
            f" and {cal['train_tokens_per_s']:,.0f} tok/s training"
        )
    if notes:
        console.print("; ".join(notes))


def write_estimate(est: dict, run_dir: str | Path) -> Path:
    """Write `estimate.json` into a run directory (the report shows it next to the actual cost)."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "estimate.json"
    path.write_text(json.dumps(est, indent=2) + "\n", encoding="utf-8")
    return path


def run(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    if recipe is None:
        raise EstimateError("a recipe file is required, e.g. r1lab estimate recipes/grpo-tiny.yaml")
    est = estimate_recipe(recipe, overrides, args)
    print_estimate(est)
    if args.run_dir:
        print(f"wrote {write_estimate(est, args.run_dir)}")
    return 0
