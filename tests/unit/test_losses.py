"""GRPO's advantages and losses (`r1lab.rl.losses`) against values worked out by hand.

The numbers in each test are computed in its comments, so a reader can check them without torch.
The last tests check the training contract the trainer relies on: summing `aggregate` over
micro-batches with whole-step denominators gives the whole batch's loss and gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from r1lab.rl.losses import aggregate, clipped_policy_loss, group_advantages, kl_penalty, masked_mean

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def close(actual: torch.Tensor, expected, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- advantages


def test_advantages_without_scaling_are_reward_minus_group_mean():
    # group 1: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; group 2: mean 2.5 -> [-1.5, -0.5, 0.5, 1.5]
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    close(group_advantages(rewards, 4, scale=False), [0.75, -0.25, -0.25, -0.25, -1.5, -0.5, 0.5, 1.5])


def test_advantages_with_scaling_divide_by_the_group_std():
    # [1, 0, 0, 0]: mean 0.25, sample variance (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5;
    # [0, 2]: mean 1, sample std sqrt(2); eps 1e-4 is added to the std.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    close(group_advantages(rewards, 4, scale=True), [x / 0.5001 for x in (0.75, -0.25, -0.25, -0.25)])
    s = math.sqrt(2) + 1e-4
    close(group_advantages(torch.tensor([0.0, 2.0]), 2, scale=True), [-1 / s, 1 / s])


@pytest.mark.parametrize("scale", [True, False])
def test_a_constant_group_gives_zero_advantages_not_nan(scale):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, 3, scale=scale)
    assert torch.isfinite(adv).all()
    close(adv[:6], [0.0] * 6)
    assert adv[6:].abs().sum() > 0  # the mixed group still carries a signal


def test_scaling_only_changes_the_magnitude_per_group():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.2, 0.9, 0.1, 0.5])
    plain, scaled = group_advantages(rewards, 4, scale=False), group_advantages(rewards, 4, scale=True)
    assert torch.equal(plain.sign(), scaled.sign())
    for g in range(2):  # sum to zero within each group either way
        assert abs(float(plain[4 * g : 4 * g + 4].sum())) < 1e-6
        assert abs(float(scaled[4 * g : 4 * g + 4].sum())) < 1e-5


# --------------------------------------------------------------------------- clipped surrogate


def losses_for(ratio: float, adv: float, low: float, high: float) -> tuple[float, bool]:
    logp = torch.tensor([[math.log(ratio)]])
    loss, clipped = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), low, high)
    return float(loss), bool(clipped)


@pytest.mark.parametrize(
    "ratio, adv, loss, clipped",
    [
        # inside [0.8, 1.28]: loss = -r * A, never clipped
        (1.1, 2.0, -2.2, False),
        (0.9, -1.0, 0.9, False),
        # r = 1.5 > 1.28 with A > 0: min(1.5, 1.28) * A -> the clip caps the gain at 1.28
        (1.5, 1.0, -1.28, True),
        # r = 1.5 with A < 0: min(-1.5, -1.28) = -1.5 -> a harmful move is never clipped away
        (1.5, -1.0, 1.5, False),
        # r = 0.5 < 0.8 with A > 0: min(0.5, 0.8) = 0.5 -> not clipped
        (0.5, 1.0, -0.5, False),
        # r = 0.5 with A < 0: min(-0.5, -0.8) = -0.8 -> clipped at 1 - eps_low
        (0.5, -2.0, 1.6, True),
        # zero advantage: zero loss
        (3.0, 0.0, 0.0, False),
    ],
)
def test_clipped_loss_hand_values(ratio, adv, loss, clipped):
    got_loss, got_clipped = losses_for(ratio, adv, 0.2, 0.28)
    assert got_loss == pytest.approx(loss, abs=1e-5)
    assert got_clipped is clipped


def test_clip_higher_is_asymmetric():
    # r = 1.25, A = 1: inside DAPO's 1 + 0.28 but outside the symmetric 1 + 0.2
    assert losses_for(1.25, 1.0, 0.2, 0.28) == (pytest.approx(-1.25), False)
    assert losses_for(1.25, 1.0, 0.2, 0.2) == (pytest.approx(-1.2), True)
    # the lower bound does not move with eps_high: r = 0.75, A = -1 clips at 0.8 either way
    assert losses_for(0.75, -1.0, 0.2, 0.28) == (pytest.approx(0.8), True)
    assert losses_for(0.75, -1.0, 0.2, 0.2) == (pytest.approx(0.8), True)


def test_clipped_loss_broadcasts_one_advantage_per_sequence():
    logp = torch.log(torch.tensor([[1.0, 1.5], [1.0, 0.5]]))  # [B=2, T=2] ratios
    loss, clipped = clipped_policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), 0.2, 0.2)
    close(loss, [[-1.0, -1.2], [1.0, 0.8]])
    assert clipped.tolist() == [[False, True], [False, True]]


def test_on_policy_ratio_is_one_and_gradient_is_minus_advantage_times_dlogp():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, requires_grad=True)  # [B, T, V]
    ids = torch.randint(0, 7, (3, 4))  # [B, T]
    adv = torch.tensor([1.5, -0.5, 0.0])  # [B]

    def logp_of(lg: torch.Tensor) -> torch.Tensor:
        return lg.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, T]

    logp = logp_of(logits)
    loss, clipped = clipped_policy_loss(logp, logp.detach(), adv, 0.2, 0.28)
    assert not clipped.any()
    close(loss, -adv.unsqueeze(1).expand(3, 4))  # ratio exactly 1: loss = -A
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (expected,) = torch.autograd.grad((-adv.unsqueeze(1) * logp_of(logits)).sum(), logits)
    close(grad, expected, tol=1e-6)  # d loss = -A * d logp: the REINFORCE gradient


# --------------------------------------------------------------------------- KL


def test_kl_hand_values():
    # pi = 0.5, pi_ref = 0.25: k1 = log 2; k3 = 0.5 - log 0.5 - 1 = log 2 - 0.5
    logp, ref = torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.5]]))
    close(kl_penalty(logp, ref, "k1"), [[math.log(2), -math.log(2)]])  # k1 can be negative
    # pi = 0.25, pi_ref = 0.5: k3 = 2 - log 2 - 1 = 1 - log 2
    close(kl_penalty(logp, ref, "k3"), [[math.log(2) - 0.5, 1 - math.log(2)]])
    assert kl_penalty(logp, ref).equal(kl_penalty(logp, ref, "k3"))  # k3 is the default


def test_k3_is_non_negative_and_zero_only_at_equality():
    torch.manual_seed(0)
    logp, ref = -5 * torch.rand(64, 32), -5 * torch.rand(64, 32)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert kl_penalty(logp, logp, "k3").abs().max() == 0


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_average_to_the_exact_kl(kind):
    # E_{x~pi}[k(x)] over a categorical, computed exactly by weighting with pi, equals KL(pi || ref).
    torch.manual_seed(1)
    logp, ref = torch.randn(10).log_softmax(0), torch.randn(10).log_softmax(0)
    exact = (logp.exp() * (logp - ref)).sum()
    estimate = (logp.exp() * kl_penalty(logp[None], ref[None], kind)[0]).sum()
    close(estimate, exact)


# --------------------------------------------------------------------------- aggregation

# 3 sequences of 3, 2 and 1 real tokens; the padding holds junk that must not count.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [7.0, 99.0, 99.0]])
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 22 / 6),  # (6 + 9 + 7) / 6 tokens
        ("seq-mean-token-mean", (2.0 + 4.5 + 7.0) / 3),  # per-sequence means, then their mean
        ("seq-mean-token-sum-norm", 22 / (3 * 4)),  # token sum / (3 sequences * budget 4)
    ],
)
def test_aggregate_hand_values(mode, expected):
    assert float(aggregate(X, M, mode, total_tokens=6, total_seqs=3, max_tokens=4)) == pytest.approx(expected)


def test_aggregate_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="seq-sum"):
        aggregate(X, M, "seq-sum", 6, 3, 4)


def test_token_mean_weights_long_sequences_more_than_seq_mean():
    # one long sequence of ones, one short of zeros: token-mean 4/5, seq-mean (1 + 0) / 2
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate(x, m, "token-mean", 5, 2, 4)) == pytest.approx(0.8)
    assert float(aggregate(x, m, "seq-mean-token-mean", 5, 2, 4)) == pytest.approx(0.5)


def test_masked_mean_ignores_padding():
    assert masked_mean(X, M) == pytest.approx(22 / 6)
    assert masked_mean(X, torch.zeros_like(M)) == 0.0


def random_batch(seed: int, b: int = 7, t: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)  # [B] every sequence has a token
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()  # [B, T]
    return torch.randn(b, t, generator=g), mask


def micro_sum(values: torch.Tensor, mask: torch.Tensor, mode: str, splits: list[int]) -> torch.Tensor:
    """Sum of `aggregate` over micro-batches, each trimmed to its own longest sequence."""
    total_tokens, total_seqs, budget = float(mask.sum()), values.shape[0], values.shape[1]
    out, start = torch.zeros(()), 0
    for size in splits:
        v, m = values[start : start + size], mask[start : start + size]
        width = int(m.sum(1).max())  # a micro-batch is padded only to its own longest row
        out = out + aggregate(v[:, :width], m[:, :width], mode, total_tokens, total_seqs, budget)
        start += size
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [[7], [1] * 7, [2, 1, 4], [3, 4]])
def test_micro_batches_with_whole_step_denominators_sum_to_the_whole_batch(mode, splits):
    values, mask = random_batch(seed=len(splits))
    values.requires_grad_(True)
    whole = aggregate(values, mask, mode, float(mask.sum()), values.shape[0], values.shape[1])
    (g_whole,) = torch.autograd.grad(whole, values)
    summed = micro_sum(values, mask, mode, splits)
    (g_summed,) = torch.autograd.grad(summed, values)
    close(summed, whole)
    close(g_summed, g_whole)


def test_local_denominators_would_break_accumulation():
    # the reason denominators are passed in: a per-micro-batch token-mean weighs tokens unequally
    values, mask = random_batch(seed=3)
    whole = aggregate(values, mask, "token-mean", float(mask.sum()), 7, 6)
    local = sum(
        aggregate(values[s], mask[s], "token-mean", float(mask[s].sum()), 7, 6)
        * float(mask[s].sum())
        / float(mask.sum())
        for s in (slice(0, 3), slice(3, 7))
    )
    close(local, whole)  # re-weighting by token share recovers it ...
    naive = sum(
        aggregate(values[s], mask[s], "token-mean", float(mask[s].sum()), 7, 6) / 2
        for s in (slice(0, 3), slice(3, 7))
    )
    assert abs(float(naive) - float(whole)) > 1e-3  # ... averaging local means does not
