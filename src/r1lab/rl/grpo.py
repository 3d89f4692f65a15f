"""GRPO: reinforcement learning with verifiable rewards, as in DeepSeek-R1-Zero.

Each step: draw `prompts_per_step` problems; sample `group_size` completions of each with the
current policy; score every completion with the task's rule-based reward (`r1lab.rewards.grade`,
the same grader evaluation uses); turn rewards into group-relative advantages (a completion is
good if it beats its siblings: no value network); and take `epochs x minibatches` optimiser
steps on the clipped policy-gradient loss, optionally with a KL penalty to the frozen start model.
Variants are settings, not code: GRPO (std-scaled advantages, seq-mean-token-mean), Dr. GRPO
(`scale_rewards: false`, `loss_agg: seq-mean-token-sum-norm`), DAPO (`clip_high: 0.28`,
`loss_agg: token-mean`, `dynamic_sampling: true`, overlong reward shaping).

Run it:  r1lab grpo recipes/grpo-arithmetic.yaml [rl.lr=3e-4 ...] [--resume]

Everything a run writes goes to its run directory (`r1lab.metrics.run`); a checkpoint holds the
weights (a Hugging Face dir), the optimiser, scheduler and RNG state and the data position, so a
resumed run takes exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import torch

from r1lab.config import R1labError, dump_config
from r1lab.metrics import RunDir, emergence_stats
from r1lab.metrics.progress import StepProgress
from r1lab.modeling import load_model, matmul_params, save_checkpoint, token_logprobs
from r1lab.modeling.onednn import fixed_weights, use_onednn_linears
from r1lab.modeling.packing import pack_micro_batches, packed_token_logprobs, packing_supported
from r1lab.modeling.train_state import (
    load_train_state,
    make_optimizer,
    make_scheduler,
    resolve_device,
    save_train_state,
    use_bf16,
)
from r1lab.rewards import grade
from r1lab.rl.config import GRPOConfig
from r1lab.rl.losses import aggregate, clipped_policy_loss, group_advantages, kl_penalty, masked_mean
from r1lab.rollout.base import Completion, SamplingParams
from r1lab.rollout.cpu import CPUEngine
from r1lab.tasks import load_task
from r1lab.tasks.base import Problem


@dataclass
class Rollout:
    """One completion ready for training: its full token sequence and its advantage."""

    ids: list[int]  # prompt + completion token ids
    prompt_len: int
    advantage: float
    sampler_logp: list[float]  # per completion token, from the sampler
    old_logp: torch.Tensor | None = None  # [C] old-policy log-probs when epochs > 1
    ref_logp: torch.Tensor | None = None  # [C] reference log-probs when kl_coef > 0


# ----------------------------------------------------------------------------- helpers


class ProblemStream:
    """Problems in a seeded order, reshuffled each epoch; `position` is what a checkpoint saves."""

    def __init__(self, problems: list[Problem], seed: int, position: int = 0):
        if not problems:
            raise R1labError("the training task has no problems")
        self.problems, self.seed, self.position = problems, seed, position

    def take(self, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.problems))
            order = list(range(len(self.problems)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.problems[order[i]])
            self.position += 1
        return out


def collate(rows: list[Rollout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and the mask of positions that predict completion tokens."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, L]
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]
    target = torch.zeros((len(rows), width - 1))  # [B, L-1]  logits at t predict token t+1
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
        attn[b, : len(r.ids)] = 1
        target[b, r.prompt_len - 1 : len(r.ids) - 1] = 1.0
    return ids, attn, target


def scatter_rows(values: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Place per-sequence completion values ([C_b] each) at the completion positions of `mask` [B, L-1]."""
    out = torch.zeros_like(mask)  # [B, L-1]
    out[mask.bool()] = torch.cat(values).to(device=out.device, dtype=out.dtype)
    return out


def micro_batches(rows: list[Rollout], token_budget: int, pack: bool = False) -> list[list[Rollout]]:
    """Cut rows into micro-batches of about `token_budget` model tokens each.

    Packed (`pack`): the sequences are laid end to end, first-fit decreasing, in rows as long as the
    longest one, `token_budget // longest` rows per micro-batch. Longer rows would hold more short
    sequences each, but attention runs over the whole row under the block-diagonal mask: twice the
    longest was no faster at d=256 and slower at d=192 (benchmarks/README.md). Otherwise rows of
    similar length are grouped so that rows x max_len stays under the budget (right-padded).
    """
    if pack and rows:
        lengths = [len(r.ids) for r in rows]
        groups = pack_micro_batches(lengths, range(len(rows)), max(lengths), token_budget)
        return [[rows[i] for row in group for i in row] for group in groups]
    ordered = sorted(rows, key=lambda r: len(r.ids))
    out, cur = [], []
    for r in ordered:
        if cur and (len(cur) + 1) * len(r.ids) > token_budget:
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def batch_logprobs(
    model, mb: list[Rollout], ids: torch.Tensor, attn: torch.Tensor, pack: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies `[b, L-1]` of a micro-batch in its right-padded layout (`collate`),
    computed on the padded rows or, with `pack`, on packed ones (same values; less padding run)."""
    if pack:
        return packed_token_logprobs(model, [r.ids for r in mb], ids.shape[1])  # rows of the longest
    return token_logprobs(model, ids, attn)


def completion_logps(
    model, rows: list[Rollout], pad_id: int, budget: int, autocast: bool, pack: bool = False
) -> list[torch.Tensor]:
    """Per-sequence completion log-probs ([C] each) under `model`, without gradients."""
    out: dict[int, torch.Tensor] = {}
    dev = next(model.parameters()).device
    pack = pack and packing_supported(model)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast), fixed_weights():
        for mb in micro_batches(rows, budget, pack):
            ids, attn, mask = (t.to(dev) for t in collate(mb, pad_id))
            logp, _ = batch_logprobs(model, mb, ids, attn, pack)  # [b, L-1]
            for b, r in enumerate(mb):
                out[id(r)] = logp[b][mask[b].bool()].float()
    return [out[id(r)] for r in rows]


def policy_update(
    model, ref_model, optimizer, scheduler, rows: list[Rollout], cfg: GRPOConfig, pad_id: int, rng
):
    """`epochs x minibatches` optimiser steps on the clipped GRPO loss; returns logging stats."""
    rl = cfg.rl
    bf16 = use_bf16(rl.precision)
    dev = next(model.parameters()).device
    skipped = {id(r) for r in rows if skippable(r, rl, ref_model)}  # rows left out of every pass
    pack = rl.pack_sequences and packing_supported(model)
    if rl.epochs > 1 and rl.old_logp == "recompute":
        live = [r for r in rows if id(r) not in skipped]
        for r, lp in zip(
            live, completion_logps(model, live, pad_id, rl.micro_batch_tokens, bf16, pack), strict=True
        ):
            r.old_logp = lp
    elif rl.epochs > 1:
        for r in rows:
            r.old_logp = torch.tensor(r.sampler_logp)
    if ref_model is not None:
        for r, lp in zip(
            rows,
            completion_logps(ref_model, rows, pad_id, rl.micro_batch_tokens, bf16, rl.pack_sequences),
            strict=True,
        ):
            r.ref_logp = lp
    sums = {"loss": 0.0, "entropy": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "tokens": 0.0}
    n_opt = 0
    for _ in range(rl.epochs):
        order = rows[:]
        rng.shuffle(order)
        size = -(-len(order) // rl.minibatches)
        for start in range(0, len(order), size):
            minibatch = order[start : start + size]
            total_tokens = float(sum(len(r.ids) - r.prompt_len for r in minibatch))  # before any skip
            trained = [r for r in minibatch if id(r) not in skipped]
            with fixed_weights():  # the weights change only at the optimiser step below
                for mb in micro_batches(trained, rl.micro_batch_tokens, pack):
                    ids, attn, mask = (t.to(dev) for t in collate(mb, pad_id))
                    adv = torch.tensor([r.advantage for r in mb], device=dev)  # [b]
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                        logp, entropy = batch_logprobs(model, mb, ids, attn, pack)  # [b, L-1]
                    logp = logp.float()
                    old = (
                        logp.detach() if rl.epochs == 1 else scatter_rows([r.old_logp for r in mb], mask)
                    )  # [b, L-1]
                    loss_tok, clipped = clipped_policy_loss(
                        logp, old, adv, rl.clip_low, rl.clip_high
                    )  # [b, L-1]
                    if ref_model is not None:
                        kl_tok = kl_penalty(
                            logp, scatter_rows([r.ref_logp for r in mb], mask), rl.kl_estimator
                        )  # [b, L-1]
                        loss_tok = loss_tok + rl.kl_coef * kl_tok
                        sums["kl"] += float((kl_tok.detach() * mask).sum())
                    loss = aggregate(
                        loss_tok, mask, rl.loss_agg, total_tokens, len(minibatch), cfg.sampling.max_tokens
                    )
                    loss.backward()
                    n_tok = float(mask.sum())
                    sums["loss"] += float(loss.detach())
                    sums["entropy"] += masked_mean(entropy.detach().float(), mask) * n_tok
                    sums["clip_frac"] += masked_mean(clipped.float(), mask) * n_tok
                    sums["tokens"] += n_tok
            if len(trained) < len(minibatch):
                zero_missing_grads(model)  # AdamW must step as if the skipped rows had run
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), rl.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            sums["grad_norm"] += float(grad_norm)
            n_opt += 1
    tok = max(sums["tokens"], 1.0)
    sampled = [lp for r in rows for lp in r.sampler_logp]
    plain_sampling = cfg.sampling.temperature == 1.0 and cfg.sampling.top_p == 1.0
    return {
        "loss": sums["loss"] / n_opt,
        # exact entropy over the rows that ran (None when all were skipped); entropy_sampled is the
        # Monte Carlo estimate -mean log p(sampled token) over every row, free from the rollout, and
        # only an estimate of the policy's entropy when sampling is plain (temperature 1, top_p 1)
        "entropy": sums["entropy"] / tok if sums["tokens"] else None,
        "entropy_sampled": -sum(sampled) / max(len(sampled), 1) if plain_sampling and any(sampled) else None,
        "kl": sums["kl"] / tok if ref_model is not None else 0.0,
        # over every completion token, skipped rows included (they are never clipped): comparable
        # with and without the skip
        "clip_frac": sums["clip_frac"] / max(sum(len(r.ids) - r.prompt_len for r in rows) * rl.epochs, 1),
        "grad_norm": sums["grad_norm"] / n_opt,
        "trained_tokens": int(sum(len(r.ids) for r in rows if id(r) not in skipped) * rl.epochs),
        "skipped_rows": len(skipped),
    }


def skippable(row: Rollout, rl, ref_model) -> bool:
    """A row that cannot change the gradient: advantage 0 and no KL term.

    Its clipped loss is -0 x min(ratio, clip(ratio)) = 0 at every token, so its gradient is exactly
    zero; leaving it out saves its forward and backward (with random or saturated policies, most of
    the update). Its tokens still count in the loss denominators (computed before the skip), so the
    update is the same, bit for bit up to summation order.
    """
    return rl.skip_zero_advantage and ref_model is None and row.advantage == 0.0


def zero_missing_grads(model) -> None:
    """Zero gradients where backward never ran, so the optimiser steps every parameter (weight decay,
    moment decay, step count) exactly as it would have with the skipped rows included."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def score(completions: list[Completion], problems: list[Problem], cfg: GRPOConfig):
    """Rewards of every completion, by the shared grader (the one evaluation uses too)."""
    return [
        grade(
            c.text,
            problems[c.prompt_index],
            cfg.reward,
            n_tokens=len(c.token_ids),
            max_tokens=cfg.sampling.max_tokens,
        )
        for c in completions
    ]


def mean_parts(rewards) -> dict[str, float]:
    """Mean of each reward part over a batch, keyed `reward/<part>` for metrics.jsonl."""
    parts: dict[str, float] = {}
    for r in rewards:
        for k, v in r.parts.items():
            parts[f"reward/{k}"] = parts.get(f"reward/{k}", 0.0) + v / len(rewards)
    return parts


def sample_groups(engine, stream: ProblemStream, cfg: GRPOConfig, step: int):
    """Sample a batch of groups; with dynamic sampling, drop all-equal groups and refill (DAPO)."""
    rl, n = cfg.rl, cfg.rl.prompts_per_step
    kept: list[tuple[Problem, list[Completion], list]] = []
    all_completions, all_rewards, rounds, dropped = [], [], 0, 0
    while len(kept) < n and rounds <= (rl.max_refill_rounds if rl.dynamic_sampling else 0):
        problems = stream.take(n - len(kept) if rounds else n)
        params = SamplingParams(
            temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p,
            max_tokens=cfg.sampling.max_tokens,
            stop=tuple(cfg.sampling.stop),
            seed=cfg.seed * 1_000_003 + step * 101 + rounds,
        )
        completions = engine.generate([p.messages for p in problems], rl.group_size, params)
        rewards = score(completions, problems, cfg)
        all_completions += completions
        all_rewards += rewards
        for i, p in enumerate(problems):
            group = slice(i * rl.group_size, (i + 1) * rl.group_size)
            scores = [r.score for r in rewards[group]]
            if rl.dynamic_sampling and max(scores) == min(scores):
                dropped += 1
                continue
            kept.append((p, completions[group], rewards[group]))
        rounds += 1
    return kept, all_completions, all_rewards, {"dropped_groups": dropped, "sampling_rounds": rounds}


# ----------------------------------------------------------------------------- the loop


def train(cfg: GRPOConfig, resume: bool = False) -> dict:
    """Run GRPO as configured; returns the last step's metrics (and `final_checkpoint`)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.run_dir)
    latest = run.latest_checkpoint()
    if not resume and (latest is not None or run.read_metrics()):
        raise R1labError(
            f"{run.path} already holds a run; pass --resume to continue it or choose another run_dir"
        )
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    train_problems = load_task(cfg.task)  # tasks first: a bad task name fails before any model loads
    eval_spec = cfg.eval_task or cfg.task.model_copy(update={"split": "test", "limit": cfg.eval_problems})
    eval_problems = load_task(eval_spec)[: cfg.eval_problems]
    model, tokenizer = load_model(latest if (resume and latest) else cfg.model)
    model.to(device)
    use_onednn_linears(model)  # fp32 on CPU: oneDNN's GEMM where it beats MKL's
    ref_model = None
    if cfg.rl.kl_coef > 0:
        ref_model, _ = load_model(cfg.model)
        ref_model.to(device)
        ref_model.requires_grad_(False).eval()
        use_onednn_linears(ref_model)
    optimizer = make_optimizer(model, cfg.rl.lr, cfg.rl.weight_decay, cfg.rl.betas)
    total_opt_steps = cfg.rl.steps * cfg.rl.epochs * cfg.rl.minibatches
    scheduler = make_scheduler(optimizer, cfg.rl.lr_schedule, cfg.rl.warmup_steps, total_opt_steps)
    start_step, position = 0, 0
    if resume and latest is not None:
        extra = load_train_state(latest, optimizer, scheduler)
        start_step, position = extra["step"], extra["position"]
        run.truncate_metrics(start_step)
    dump_config(cfg, run.config_path)
    stream = ProblemStream(train_problems, cfg.seed, position)
    engine = make_engine(cfg, model, tokenizer)
    if cfg.rl.pack_sequences and not packing_supported(model):
        print(
            f"grpo: {type(model).__name__} does not keep packed sequences apart (checked on a probe); "
            "the update runs on right-padded rows",
            file=sys.stderr,
        )
    n_params = matmul_params(model)  # FLOPs: 2N per token forward, 6N trained
    pad_id = tokenizer.pad_token_id
    shuffle_rng = random.Random(cfg.seed)
    t_start, last = time.monotonic(), {}

    def save(step: int) -> None:
        def write(tmp):
            save_checkpoint(model, tokenizer, tmp)
            save_train_state(tmp, optimizer, scheduler, {"step": step, "position": stream.position})

        run.save_checkpoint(step, write, keep_last=cfg.keep_checkpoints)

    with StepProgress(
        "grpo", cfg.rl.steps, start_step, enabled=cfg.progress, tensorboard_dir=run.path / "tb"
    ) as bar:
        for step in range(start_step, cfg.rl.steps):
            t0 = time.monotonic()
            shuffle_rng.seed(cfg.seed * 7919 + step)
            engine.sync_weights()
            kept, completions, rewards, sample_stats = sample_groups(engine, stream, cfg, step)
            t_rollout = time.monotonic() - t0
            rows = []
            for _problem, group, group_rewards in kept:
                adv = group_advantages(
                    torch.tensor([r.score for r in group_rewards]), len(group), cfg.rl.scale_rewards
                )
                for c, a in zip(group, adv.tolist(), strict=True):
                    rows.append(
                        Rollout(c.prompt_token_ids + c.token_ids, len(c.prompt_token_ids), a, c.logprobs)
                    )
            model.train()
            update = (
                policy_update(model, ref_model, optimizer, scheduler, rows, cfg, pad_id, shuffle_rng)
                if rows
                else {}
            )
            model.eval()
            lengths = [len(c.token_ids) for c in completions]
            gen_tokens = sum(lengths) + sum(
                len(c.prompt_token_ids) for c in completions[:: cfg.rl.group_size]
            )
            extra_fwd = (cfg.rl.epochs > 1 and cfg.rl.old_logp == "recompute") + (ref_model is not None)
            flops = 2 * n_params * gen_tokens + (6 + 2 * extra_fwd) * n_params * update.get(
                "trained_tokens", 0
            )
            parts = mean_parts(rewards)
            stats = {
                "step": step + 1,
                "reward": sum(r.score for r in rewards) / len(rewards),
                **parts,
                "accuracy": parts.get("reward/accuracy", 0.0),
                "format_rate": parts.get("reward/format", 0.0),
                **emergence_stats([c.text for c in completions], lengths, cfg.reflection_words),
                "truncated_rate": sum(c.finish_reason == "length" for c in completions) / len(completions),
                **update,
                **sample_stats,
                "lr": scheduler.get_last_lr()[0],
                "tokens": sum(lengths),
                "rollout_time": t_rollout,
                "step_time": time.monotonic() - t0,
                "flops": flops,
                "elapsed": time.monotonic() - t_start,
            }
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.rl.steps:
                stats.update(held_out(engine, eval_problems, cfg))
            if cfg.samples_every and (done % cfg.samples_every == 0 or done == cfg.rl.steps):
                run.write_samples(f"step_{done}", _sample_rows(completions, rewards, cfg))
            run.log(stats)
            bar.update(done, stats)
            last = stats
            out_of_time = cfg.max_seconds is not None and time.monotonic() - t_start > cfg.max_seconds
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.rl.steps or out_of_time:
                save(done)
            if out_of_time:
                break
    final = run.latest_checkpoint()
    return {**last, "final_checkpoint": str(final) if final else None}


def make_engine(cfg: GRPOConfig, model, tokenizer):
    """The rollout engine: r1lab's CPU engine reading the policy's weights, or vLLM synced from them."""
    if cfg.engine == "vllm":
        from r1lab.rollout.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(
            model,
            tokenizer,
            cfg.model,
            dtype=cfg.engine_dtype,
            seed=cfg.seed,
            gpu_memory_utilization=cfg.vllm_memory,
        )
    return CPUEngine(model, tokenizer, dtype=cfg.engine_dtype, seed=cfg.seed)


def held_out(engine, problems: list[Problem], cfg: GRPOConfig) -> dict[str, float]:
    """pass@1 (averaged over eval_k samples) on held-out problems, graded by the shared grader."""
    from r1lab.eval.run import evaluate

    params = SamplingParams(
        temperature=cfg.eval_temperature, top_p=1.0, max_tokens=cfg.sampling.max_tokens, seed=cfg.seed + 12345
    )
    result = evaluate(engine, problems, cfg.eval_k, params, cfg.reward, progress=False)
    s = result.summary
    return {f"eval/{k}": v for k, v in s.items() if isinstance(v, int | float)}


def _sample_rows(completions, rewards, cfg) -> list[dict]:
    rows = []
    for c, r in list(zip(completions, rewards, strict=True))[: 4 * cfg.rl.group_size]:
        rows.append(
            {
                "prompt_index": c.prompt_index,
                "text": c.text,
                "score": r.score,
                "parts": r.parts,
                "answer": r.answer,
            }
        )
    return rows
