"""`policy_update`'s fast paths give the update of the plain path.

Skipping rows of zero advantage (no KL) must give the gradients of the full update, up to
floating-point summation order, and so must different micro-batch budgets and packed sequences.
Stated tolerances: every gradient entry within 1e-6 + 1e-4 x its size at the first optimiser step
(10x that at later ones, which start from weights already apart by rounding), losses within 1e-6,
and the
parameters after two AdamW steps at lr 1e-2 within 5e-4 (Adam divides by the gradient's own
scale, so a rounding-level difference in a near-zero gradient can move a weight by up to ~lr).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from r1lab.modeling.packing import pack_rows
from r1lab.modeling.tiny import build_model
from r1lab.modeling.tokenizer import build_char_tokenizer
from r1lab.modeling.train_state import make_optimizer, make_scheduler
from r1lab.rl.config import GRPOConfig
from r1lab.rl.grpo import Rollout, policy_update

TOL = 1e-6
PARAM_TOL = 5e-4


def make_rows(n: int, zero_share: float, seed: int) -> list[Rollout]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, completion = rng.randint(4, 12), rng.randint(3, 20)
        adv = 0.0 if i < int(n * zero_share) else rng.choice((-1.0, 1.0)) * rng.uniform(0.2, 1.5)
        ids = [rng.randrange(10, 200) for _ in range(prompt + completion)]
        rows.append(Rollout(ids, prompt, adv, [-rng.uniform(0.1, 3.0) for _ in range(completion)]))
    rng.shuffle(rows)
    return rows


def config(**rl) -> GRPOConfig:
    # fp32: these are exactness tests of the update's arithmetic; "auto" would autocast to bf16 on a
    # CPU with native bf16, where summation order moves gradients by bf16 rounding, not by 1e-6
    base = {
        "steps": 4,
        "prompts_per_step": 4,
        "group_size": 4,
        "lr": 1e-2,
        "weight_decay": 0.1,
        "precision": "fp32",
    }
    return GRPOConfig.model_validate({"model": "unused", "rl": {**base, **rl}})


def run_update(model, rows, cfg, ref_model=None, updates: int = 2):
    model = copy.deepcopy(model)
    opt = make_optimizer(model, cfg.rl.lr, cfg.rl.weight_decay, cfg.rl.betas)
    sched = make_scheduler(opt, "constant", 0, cfg.rl.steps)
    model.train()
    grads: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(
        lambda *_: grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    )
    stats = [
        policy_update(model, ref_model, opt, sched, copy.deepcopy(rows), cfg, 0, random.Random(0))
        for _ in range(updates)
    ]
    return model, opt, stats, grads


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("gpt2-1m", build_char_tokenizer(), seed=0)


def max_diff(a, b) -> float:
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def assert_same_grads(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    """The first optimiser step starts from the same weights: within 1e-6 + 1e-4 x size. Later ones
    start from weights that already differ by Adam-amplified rounding (up to PARAM_TOL), so their
    gradients may differ by more than rounding: 10x looser (seen: 1.5e-6 on an AVX-512 CPU)."""
    assert len(a) == len(b) and a
    for i, (step_a, step_b) in enumerate(zip(a, b, strict=True)):
        assert len(step_a) == len(step_b)
        scale = 1 if i == 0 else 10
        for ga, gb in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4 * scale, atol=1e-6 * scale)


def assert_exact_grads(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    """float64 gradients equal up to float64 rounding at every optimiser step."""
    assert len(a) == len(b) and a
    for step_a, step_b in zip(a, b, strict=True):
        for ga, gb in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12 * float(gb.abs().max()))


@pytest.mark.parametrize(
    "agg, passes",
    [
        ("token-mean", {}),
        ("seq-mean-token-mean", {}),
        ("seq-mean-token-sum-norm", {}),
        # several optimiser steps per batch: the ratio leaves 1 and clipping happens
        ("token-mean", {"epochs": 2, "minibatches": 2, "old_logp": "recompute"}),
        ("seq-mean-token-mean", {"epochs": 2, "minibatches": 2, "old_logp": "rollout"}),
    ],
)
def test_skipping_zero_advantage_rows_gives_the_plain_update(tiny, agg, passes):
    rows = make_rows(16, zero_share=0.5, seed=1)
    fast, _, fast_stats, fast_grads = run_update(
        tiny, rows, config(loss_agg=agg, skip_zero_advantage=True, **passes)
    )
    plain, _, plain_stats, plain_grads = run_update(
        tiny, rows, config(loss_agg=agg, skip_zero_advantage=False, **passes)
    )
    assert fast_stats[0]["skipped_rows"] == 8 and plain_stats[0]["skipped_rows"] == 0
    assert fast_stats[0]["trained_tokens"] < plain_stats[0]["trained_tokens"]
    assert max_diff(fast, tiny) > 1e-3  # the update did move the weights
    assert_same_grads(fast_grads, plain_grads)
    assert max_diff(fast, plain) < PARAM_TOL
    # With one optimiser step per update the first update starts from the same weights: strict. With
    # several, even its later steps start from weights that differ by Adam-amplified rounding.
    pairs = list(zip(fast_stats, plain_stats, strict=True))
    if not passes:
        f, p = pairs.pop(0)
        assert f["loss"] == pytest.approx(p["loss"], abs=TOL)
        assert f["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-5)
        assert f["clip_frac"] == pytest.approx(p["clip_frac"], abs=TOL)
    for f, p in pairs:
        assert f["loss"] == pytest.approx(p["loss"], rel=1e-4, abs=TOL)
        assert f["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4)
        assert f["clip_frac"] == pytest.approx(p["clip_frac"], abs=0.01)
    if passes:
        assert plain_stats[-1]["clip_frac"] > 0  # not vacuous: some ratios left the clip range


def test_a_batch_of_zero_advantages_still_steps_the_optimiser_like_the_plain_path(tiny):
    """All rows skipped: no forward at all, yet AdamW's weight decay and moments move as before."""
    rows = make_rows(8, zero_share=1.0, seed=2)
    fast, fast_opt, stats, fast_grads = run_update(tiny, rows, config(weight_decay=0.5))
    plain, _, _, plain_grads = run_update(tiny, rows, config(weight_decay=0.5, skip_zero_advantage=False))
    assert stats[0]["skipped_rows"] == 8 and stats[0]["entropy"] is None
    assert stats[0]["entropy_sampled"] > 0
    assert max_diff(fast, tiny) > 0  # weight decay moved the matrices
    assert_same_grads(fast_grads, plain_grads)
    assert all(float(g.abs().max()) == 0.0 for step in fast_grads for g in step)
    assert max_diff(fast, plain) < TOL
    steps = [s["step"] for s in fast_opt.state.values()]
    assert steps and all(float(s) == 2 for s in steps)


def test_with_kl_no_row_is_skipped(tiny):
    rows = make_rows(8, zero_share=0.5, seed=3)
    ref = copy.deepcopy(tiny).eval()
    _, _, stats, _ = run_update(tiny, rows, config(kl_coef=0.1), ref_model=ref, updates=1)
    assert stats[0]["skipped_rows"] == 0
    assert stats[0]["trained_tokens"] == sum(len(r.ids) for r in rows)  # every row ran: its KL has a gradient


@pytest.mark.parametrize("budget", [64, 256])  # one row per micro-batch; a few rows each
def test_micro_batch_budget_does_not_change_the_update(tiny, budget):
    rows = make_rows(12, zero_share=0.25, seed=4)
    padded = {"pack_sequences": False}
    small, _, _, small_grads = run_update(tiny, rows, config(micro_batch_tokens=budget, **padded), updates=2)
    one, _, _, one_grads = run_update(tiny, rows, config(micro_batch_tokens=1_000_000, **padded), updates=2)
    assert_same_grads(small_grads, one_grads)
    assert max_diff(small, one) < PARAM_TOL
    # Packed (the default), in float64: packing regroups the embedding-gradient sums, so float32
    # differs at ~1e-6 of a tensor's largest entry; the arithmetic itself must not change.
    model = copy.deepcopy(tiny).double()
    small, _, _, small_grads = run_update(model, rows, config(micro_batch_tokens=budget), updates=2)
    one, _, _, one_grads = run_update(model, rows, config(micro_batch_tokens=1_000_000), updates=2)
    assert_exact_grads(small_grads, one_grads)
    assert max_diff(small, one) < 1e-9


@pytest.mark.parametrize(
    "rl",
    [
        {"loss_agg": "token-mean"},
        {"loss_agg": "seq-mean-token-mean", "micro_batch_tokens": 64},  # one packed row per micro-batch
        {"epochs": 2, "minibatches": 2, "old_logp": "recompute"},  # old log-probs computed packed too
        {"kl_coef": 0.1},  # the reference model's log-probs too
    ],
)
def test_packed_sequences_give_the_padded_update(tiny, rl):
    """In float64, so that what remains is the arithmetic: packing must not change it (measured 1e-15;
    in float32 both paths sit ~1e-6 of each tensor's largest gradient from the float64 one)."""
    model = copy.deepcopy(tiny).double()
    rows = make_rows(12, zero_share=0.25, seed=5)
    lengths = [len(r.ids) for r in rows]
    assert len(pack_rows(lengths, range(12), max(lengths))) < 12  # not vacuous: sequences share rows
    ref = copy.deepcopy(model).eval() if rl.get("kl_coef") else None
    packed, _, p_stats, p_grads = run_update(model, rows, config(pack_sequences=True, **rl), ref_model=ref)
    plain, _, s_stats, s_grads = run_update(model, rows, config(pack_sequences=False, **rl), ref_model=ref)
    assert_exact_grads(p_grads, s_grads)
    assert max_diff(packed, plain) < 1e-9
    assert p_stats[0]["loss"] == pytest.approx(s_stats[0]["loss"], rel=1e-4, abs=TOL)
    assert p_stats[0]["entropy"] == pytest.approx(s_stats[0]["entropy"], rel=1e-5)
    if rl.get("kl_coef"):
        assert p_stats[0]["kl"] == pytest.approx(s_stats[0]["kl"], rel=1e-4, abs=TOL)
    assert max_diff(packed, model) > 1e-3  # the update did move the weights
