"""Pretraining a tiny base model from scratch on the synthetic arithmetic corpus.

The corpus (`r1lab.tasks.corpus`) gives the base model three habits (direct answers, column
working, and self-checks that catch slips) on train-split problems only; held-out problems never
appear. Each training row is one problem: the chat-template prompt, the completion and `<eos>`, with
the loss on every token (a base model learns the prompts' distribution too). Rows are batched by
similar length so little compute is spent on padding. Deterministic: the same seed gives the same
corpus, the same batches and the same weights.

Run it:  r1lab pretrain recipes/pretrain-arithmetic.yaml [train.steps=2000 ...]

This is a stage of its own (like rl/ or sft/): it uses modeling, tasks and metrics.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from r1lab.config import (
    Section,
    TaskSpec,
    add_recipe_arguments,
    dump_config,
    load_config,
    recipe_and_overrides,
)
from r1lab.metrics import RunDir

DEFAULT_PRESET = "gpt2-2m"  # the quickstart's base


class CorpusSection(Section):
    """Mix of behaviours in the corpus (see r1lab.tasks.corpus)."""

    problems: int = Field(40_000, ge=1, description="train-split problems in the corpus (one row each)")
    direct: float = Field(0.3, ge=0, description="share of direct answers")
    working: float = Field(0.4, ge=0, description="share of column working")
    check: float = Field(0.3, ge=0, description="share of working + 'wait, let me check' + careful working")
    slip_rate: float = Field(0.4, ge=0, le=1, description="share of working passes with one slipped column")
    check_slip_rate: float = Field(
        1.0, ge=0, le=1, description="share of a check's first passes with a slip (a check follows a slip)"
    )


class PretrainTrain(Section):
    steps: int = Field(1000, ge=1, description="optimiser steps")
    batch_size: int = Field(64, ge=1, description="rows per step")
    lr: float = Field(1.5e-3, gt=0, description="peak learning rate (3e-3 failed to learn the working here)")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast where the CPU has native bf16 matmuls (auto), or forced either way"
    )


class PretrainConfig(Section):
    """`r1lab pretrain RECIPE`: a tiny base model from scratch."""

    preset: str = Field(DEFAULT_PRESET, description="tiny model preset (r1lab.modeling.tiny.PRESETS)")
    out: str = Field("runs/base", description="run directory; the model is written to OUT/model")
    seed: int = Field(0)
    threads: int | None = Field(None, ge=1, description="torch threads (None: all cores)")
    task: TaskSpec = Field(default_factory=lambda: TaskSpec(name="arithmetic", split="train"))
    corpus: CorpusSection = Field(default_factory=CorpusSection)
    train: PretrainTrain = Field(default_factory=PretrainTrain)
    progress: bool = Field(True)


def corpus_rows(cfg: PretrainConfig, tokenizer) -> list[list[int]]:
    """Token ids of every corpus row: chat prompt + completion + eos."""
    from r1lab.tasks import load_task
    from r1lab.tasks.corpus import CorpusMix, build_arithmetic_corpus

    spec = cfg.task.model_copy(update={"split": "train", "limit": cfg.corpus.problems, "seed": cfg.seed})
    c = cfg.corpus
    mix = CorpusMix(
        direct=c.direct,
        working=c.working,
        check=c.check,
        slip_rate=c.slip_rate,
        check_slip_rate=c.check_slip_rate,
    )
    pairs = build_arithmetic_corpus(load_task(spec), mix, cfg.seed)
    texts = [
        tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) + completion
        for p, completion in pairs
    ]
    rows = tokenizer(texts, add_special_tokens=False)[
        "input_ids"
    ]  # one batched call: far faster than per row
    for r in rows:
        r.append(tokenizer.eos_token_id)
    return rows


def length_batches(rows: list[list[int]], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of row indices; each batch is drawn from rows of similar length (less padding)."""
    rng = random.Random(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = list(range(len(rows)))
        rng.shuffle(order)
        # sort within windows of 16 batches: similar lengths together, order still random across windows
        window = batch_size * 16
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(rows[i]))
            chunk_batches = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
            rng.shuffle(chunk_batches)
            batches.extend(b for b in chunk_batches if len(b) == batch_size)
    return batches[:steps]


def pad(rows: list[list[int]], pad_id: int):
    """Right-padded ids, attention mask and labels (-100 on padding) for a batch of rows."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, L]
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        attn[b, : len(r)] = 1
    labels = ids.masked_fill(attn == 0, -100)  # [B, L]  no loss on padding
    return ids, attn, labels


def pretrain(cfg: PretrainConfig) -> Path:
    """Train the base model; returns the path of its Hugging Face directory (OUT/model)."""
    import torch

    from r1lab.metrics.progress import StepProgress
    from r1lab.modeling import build_char_tokenizer, build_model, matmul_params, save_checkpoint
    from r1lab.modeling.onednn import use_onednn_linears
    from r1lab.modeling.train_state import make_optimizer, make_scheduler, use_bf16

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out)
    if run.metrics_path.exists():
        run.metrics_path.unlink()  # pretraining always starts afresh; stale rows would mix two runs
    dump_config(cfg, run.config_path)
    torch.manual_seed(cfg.seed)
    tokenizer = build_char_tokenizer()
    model = build_model(cfg.preset, tokenizer, seed=cfg.seed)
    use_onednn_linears(model)  # fp32 on CPU: oneDNN's GEMM where it beats MKL's
    rows = corpus_rows(cfg, tokenizer)
    t = cfg.train
    batches = length_batches(rows, t.batch_size, t.steps, cfg.seed)
    optimizer = make_optimizer(model, t.lr, t.weight_decay, (0.9, 0.95))
    scheduler = make_scheduler(optimizer, "cosine", t.warmup_steps, t.steps)
    bf16 = use_bf16(t.precision)
    model.train()
    t0 = time.monotonic()
    tokens = 0
    with StepProgress("pretrain", t.steps, keys=("loss", "tok_per_s"), enabled=cfg.progress) as bar:
        for step, batch in enumerate(batches, start=1):
            ids, attn, labels = pad([rows[i] for i in batch], tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            tokens += int(attn.sum())
            elapsed = time.monotonic() - t0
            stats = {
                "step": step,
                "loss": float(loss.detach()),
                "lr": scheduler.get_last_lr()[0],
                "tokens": tokens,
                "tok_per_s": tokens / max(elapsed, 1e-9),
                "elapsed": elapsed,
            }
            if step % 10 == 0 or step == t.steps:
                run.log(stats)
            bar.update(step, stats)
    model.eval()
    out = run.path / "model"
    save_checkpoint(model, tokenizer, out)
    summary = {
        "preset": cfg.preset,
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(rows),
        "steps": t.steps,
        "tokens": tokens,
        "seconds": time.monotonic() - t0,
        "flops": 6 * matmul_params(model) * tokens,
    }
    run.write_json("pretrain_summary.json", summary)
    return out


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)


def run(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    path = pretrain(load_config(PretrainConfig, recipe, overrides))
    print(f"base model: {path}")
    return 0
