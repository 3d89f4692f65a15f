"""Supervised fine-tuning: next-token cross-entropy on the assistant's tokens only.

This is the SFT of the R1 recipe: the cold-start stage (a few thousand long chain-of-thought
traces before RL), the rejection-sampling stage (verified samples of the RL model), and
distillation (a small student trained on a strong teacher's verified traces). The loss is the
mean negative log-likelihood of every assistant token (its content and the token that ends the
turn), averaged over all such tokens of the optimiser step; prompts, system turns and padding
carry no loss. Micro-batches of at most `micro_batch_tokens` tokens are accumulated, and because
each one's summed loss is divided by the step's total target count, any cut of a step into
micro-batches gives the same gradient as one big batch. AdamW, warmup then cosine (or linear /
constant) decay, gradient clipping, optional bf16 autocast.

Run it:  r1lab sft recipes/sft-tiny.yaml [lr=3e-4 epochs=2 ...] [--resume]

A checkpoint (every `save_every` steps, at `max_seconds`, and at the end) holds the weights as a
Hugging Face directory plus the optimiser, scheduler and RNG state and the step number; the data
order is a pure function of (seed, epoch), so a resumed run takes exactly the steps an
uninterrupted one would have taken. The final model is exported to RUN/model.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1lab.config import R1labError, dump_config
from r1lab.metrics import RunDir
from r1lab.metrics.progress import StepProgress
from r1lab.modeling import load_model, matmul_params, save_checkpoint
from r1lab.modeling.onednn import use_onednn_linears
from r1lab.modeling.packing import packing_supported
from r1lab.modeling.train_state import (
    load_train_state,
    make_optimizer,
    make_scheduler,
    resolve_device,
    save_train_state,
)
from r1lab.sft.config import SFTConfig
from r1lab.sft.data import (
    Example,
    MicroBatch,
    TraceError,
    encode_all,
    epoch_steps,
    read_conversations,
    step_micro_batches,
)


def sft_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, denom: float
) -> torch.Tensor:
    """Summed cross-entropy of the target tokens divided by `denom` (the step's target count).

    Logits at position t predict token t+1, so the target mask is shifted by one. Only the selected
    rows of the logits are upcast, never the whole [B, T, V] tensor.
    """
    pred = logits[:, :-1]  # [B, T-1, V]  position t predicts token t+1
    mask = targets[:, 1:]  # [B, T-1]
    picked = pred[mask].float()  # [N, V]  N = target tokens in this micro-batch
    labels = input_ids[:, 1:][mask]  # [N]
    return F.cross_entropy(picked, labels, reduction="sum") / denom  # []


def count_targets(mbs: list[MicroBatch]) -> int:
    """Target tokens of a step (those predicted from a previous token)."""
    return sum(int(mb.targets[:, 1:].sum()) for mb in mbs)


def accumulate(model, mbs: list[MicroBatch], autocast_bf16: bool, device) -> tuple[float, int]:
    """Forward/backward every micro-batch of a step, adding into `.grad`; returns (step loss, targets)."""
    n_targets = count_targets(mbs)
    total = 0.0
    for mb in mbs:
        inputs = {k: v.to(device) for k, v in mb.model_inputs().items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        loss = sft_loss(logits, inputs["input_ids"], mb.targets.to(device), max(n_targets, 1))  # []
        loss.backward()
        total += float(loss.detach())
    return total, n_targets


def train_step(
    model, optimizer, scheduler, mbs: list[MicroBatch], cfg: SFTConfig, device
) -> dict[str, float]:
    """One optimiser step over the step's micro-batches (gradient accumulation), clipped; returns stats."""
    loss, n_targets = accumulate(model, mbs, cfg.autocast_bf16, device)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]  # the rate this step used
    scheduler.step()
    return {"loss": loss, "grad_norm": float(grad_norm), "lr": lr, "tokens": n_targets}


def plan_total_steps(n_examples: int, cfg: SFTConfig) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps)."""
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    total = per_epoch * cfg.epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def data_fingerprint(examples: list[Example]) -> dict[str, int]:
    """What a checkpoint remembers of its data, so a resume on different data is refused, not silent."""
    return {"examples": len(examples), "tokens": sum(len(e.ids) for e in examples)}


# ----------------------------------------------------------------------------- the loop


def train(cfg: SFTConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Fine-tune as configured; returns the last step's metrics plus `model` (the exported dir).

    `stop_after` ends the run after that many steps as an interruption would (tests use it to check
    that a resumed run equals an uninterrupted one).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    run = RunDir(cfg.run_dir)
    latest = run.latest_checkpoint()
    if not resume and (latest is not None or run.read_metrics()):
        raise R1labError(
            f"{run.path} already holds a run; pass --resume to continue it or choose another run_dir"
        )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer = load_model(latest if (resume and latest) else cfg.model, device=device)
    use_onednn_linears(model)  # fp32 on CPU: oneDNN's GEMM where it beats MKL's
    if cfg.batching == "pack" and not packing_supported(model):
        raise R1labError(
            f"{cfg.model}: batching=pack needs a model that keeps packed sequences apart (given position "
            f"ids and no attention mask); {type(model).__name__} does not (checked on a probe). "
            "Use batching=bucket"
        )
    examples, dropped = encode_all(tokenizer, read_conversations(cfg.data), cfg.max_seq_len)
    if not examples:
        raise TraceError(
            f"{', '.join(cfg.data)}: every conversation is longer than max_seq_len={cfg.max_seq_len}"
        )
    per_epoch, total_steps = plan_total_steps(len(examples), cfg)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = make_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, total_steps)
    start = 0
    fingerprint = data_fingerprint(examples)
    if resume and latest is not None:
        extra = load_train_state(latest, optimizer, scheduler)
        if extra.get("data", fingerprint) != fingerprint:
            raise R1labError(
                f"{latest}: the training data changed since this checkpoint ({extra['data']} -> {fingerprint}); "
                "an exact resume is impossible, start a new run_dir"
            )
        start = extra["step"]
        run.truncate_metrics(start)
    dump_config(cfg, run.config_path)
    print(
        f"sft: {len(examples)} conversations ({dropped} longer than {cfg.max_seq_len} tokens dropped), "
        f"{per_epoch} steps/epoch, {total_steps} steps, batching={cfg.batching}, device={device.type}"
    )
    n_params, pad_id = matmul_params(model), tokenizer.pad_token_id  # FLOPs: 6N per trained token
    bucket_lengths = [len(e.ids) for e in examples] if cfg.batching == "bucket" else None
    model.train()

    def save(step: int) -> None:
        def write(tmp: Path) -> None:
            save_checkpoint(model, tokenizer, tmp)
            save_train_state(tmp, optimizer, scheduler, {"step": step, "data": fingerprint})

        run.save_checkpoint(step, write, keep_last=cfg.keep_checkpoints)

    t_start, last, trained_tokens = time.monotonic(), {}, 0
    plan_epoch, plan = -1, []  # the current epoch's steps, computed once per epoch
    keys = ("loss", "lr", "tok_per_s")
    with StepProgress(
        "sft", total_steps, start, keys=keys, enabled=cfg.progress, tensorboard_dir=run.path / "tb"
    ) as bar:
        for step in range(start, total_steps):
            t0 = time.monotonic()
            epoch, index = divmod(step, per_epoch)
            if epoch != plan_epoch:
                plan_epoch, plan = (
                    epoch,
                    epoch_steps(len(examples), cfg.batch_size, cfg.seed, epoch, bucket_lengths),
                )
            batch = plan[index]
            mbs = step_micro_batches(
                examples, batch, cfg.batching, cfg.micro_batch_tokens, cfg.max_seq_len, pad_id
            )
            stats = train_step(model, optimizer, scheduler, mbs, cfg, device)
            dt = time.monotonic() - t0
            real = sum(mb.real_tokens for mb in mbs)
            padded = sum(mb.input_ids.numel() for mb in mbs)
            trained_tokens += real
            done = step + 1
            stats = {
                "step": done,
                "epoch": epoch + (index + 1) / per_epoch,
                **stats,
                "seq_tokens": real,
                "pad_frac": 1.0 - real / padded,
                "micro_batches": len(mbs),
                "step_time": dt,
                "tok_per_s": real / max(dt, 1e-9),
                "flops": 6 * n_params * real,
                "elapsed": time.monotonic() - t_start,
            }
            run.log(stats)
            bar.update(done, stats)
            last = stats
            out_of_time = cfg.max_seconds is not None and time.monotonic() - t_start > cfg.max_seconds
            interrupted = stop_after is not None and done - start >= stop_after
            if (
                (cfg.save_every and done % cfg.save_every == 0)
                or done == total_steps
                or out_of_time
                or interrupted
            ):
                save(done)
            if out_of_time or interrupted:
                break
    model.eval()
    finished = last.get("step", start) >= total_steps
    out = run.path / "model"
    if finished:
        save_checkpoint(model, tokenizer, out)
    seconds = time.monotonic() - t_start
    run.write_json(
        "summary.json",
        {
            "stage": "sft",
            "model": str(out) if finished else None,
            "finished": finished,
            "conversations": len(examples),
            "dropped_too_long": dropped,
            "steps": last.get("step", start),
            "total_steps": total_steps,
            "trained_tokens": trained_tokens,
            "seconds": seconds,
            "tok_per_s": trained_tokens / max(seconds, 1e-9),
        },
    )
    return {**last, "model": str(out) if finished else None, "checkpoint": str(run.latest_checkpoint())}
