"""GRPO's advantages and losses as pure tensor functions.

Shapes: B = sequences in the (micro-)batch, T = completion positions (padded), G = group size.
`mask[b, t]` is 1 for real completion tokens.

Advantages (`group_advantages`): each completion's reward minus its group's mean; GRPO divides by
the group's std as well, Dr. GRPO does not (the division up-weights groups whose rewards barely
differ, a difficulty bias).

Policy loss per token (`clipped_policy_loss`): PPO's clipped surrogate with a separate lower and
upper clip range, `-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`, r = pi/pi_old. eps_high > eps_low is
DAPO's "clip-higher", which lets unlikely tokens gain probability and keeps entropy from collapsing.

Aggregation over tokens (`aggregate`), the three variants in the literature:
  - "seq-mean-token-mean": mean over each sequence's tokens, then over sequences (original GRPO;
    long wrong answers are penalised less per token: a length bias);
  - "token-mean": sum over all tokens / number of tokens (DAPO);
  - "seq-mean-token-sum-norm": sum over tokens / a constant (the generation budget), then mean over
    sequences (Dr. GRPO; no length bias).
The denominators are passed in so that gradient accumulation over micro-batches gives the same
gradient as one big batch: the trainer computes them over the whole optimiser step.

KL to a frozen reference (`kl_penalty`), per token, added to the loss with a coefficient:
  k1 = log pi - log pi_ref (unbiased, can be negative); k3 = exp(ref - logp) - (ref - logp) - 1
  (unbiased, always >= 0, lower variance; GRPO's choice).
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages; `rewards` is [N*G] with each group's G samples contiguous.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale=False)
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    grouped = rewards.view(-1, group_size)  # [N, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [N, G]
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # [N, G]
    return centred.reshape(-1)  # [N*G]


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss and a mask of the tokens where clipping was active.

    >>> lp = torch.zeros(1, 2); loss, clipped = clipped_policy_loss(lp, lp, torch.tensor([2.0]), 0.2, 0.2)
    >>> loss, clipped
    (tensor([[-2., -2.]]), tensor([[False, False]]))
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages.unsqueeze(1)  # [B, 1]
    unclipped = ratio * adv  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv  # [B, T]
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    was_clipped = clipped < unclipped  # [B, T]  the min chose the clipped branch
    return loss, was_clipped


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    >>> kl_penalty(torch.tensor([[0.0]]), torch.tensor([[0.0]]))
    tensor([[0.]])
    """
    if kind == "k1":
        return logp - ref_logp  # [B, T]
    log_ratio = ref_logp - logp  # [B, T]
    return torch.exp(log_ratio) - log_ratio - 1.0  # [B, T]


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation,
    total_tokens: float,
    total_seqs: float,
    max_tokens: float,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar; denominators are over the whole optimiser step.

    >>> x = torch.tensor([[1.0, 1.0], [4.0, 0.0]]); m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    >>> [round(aggregate(x, m, mode, 3, 2, 4).item(), 3) for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")]
    [2.0, 2.5, 0.75]
    """
    masked = per_token * mask  # [B, T]
    if mode == "token-mean":
        return masked.sum() / max(total_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B]
        return per_seq.sum() / max(total_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (max(total_seqs, 1.0) * max(max_tokens, 1.0))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` over real tokens (for logging)."""
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))
