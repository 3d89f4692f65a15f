"""The optimiser every trainer uses: AdamW, decay on matrices only, PyTorch's fused kernel where allowed."""

from __future__ import annotations

import copy

import torch

from r1lab.modeling.train_state import make_optimizer


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def reference_adamw(model: torch.nn.Module, foreach: bool) -> torch.optim.AdamW:
    """PyTorch's AdamW, not fused, with make_optimizer's groups (decay on matrices only)."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.99),
        foreach=foreach,
    )


def step_with_fixed_grads(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_fused_on_cpu_and_decay_on_matrices_only():
    model = tiny_model()
    opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.99))
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_fused_update_is_adamw():
    """Same groups, same gradients: the fused step agrees with PyTorch's reference (for-loop) AdamW."""
    fused_model, ref_model = tiny_model(), tiny_model()
    fused = make_optimizer(fused_model, 1e-2, 0.1, (0.9, 0.99))
    ref = reference_adamw(ref_model, foreach=False)  # the for-loop implementation
    step_with_fixed_grads(fused_model, fused, 5, seed=1)
    step_with_fixed_grads(ref_model, ref, 5, seed=1)
    start = tiny_model()
    for a, b, a0 in zip(fused_model.parameters(), ref_model.parameters(), start.parameters(), strict=True):
        assert (a - a0).abs().max() > 1e-3  # the steps moved every tensor
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resumes_from_a_checkpoint_of_the_foreach_optimiser():
    """Checkpoints written before the switch (foreach AdamW) load and continue the same run."""
    old_model, new_model = tiny_model(), tiny_model()
    old = reference_adamw(old_model, foreach=True)  # what make_optimizer built before
    step_with_fixed_grads(old_model, old, 3, seed=2)
    new_model.load_state_dict(old_model.state_dict())
    resumed = make_optimizer(new_model, 1e-2, 0.1, (0.9, 0.99))
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as from disk: no tensor shared with `old`
    step_with_fixed_grads(old_model, old, 2, seed=3)
    step_with_fixed_grads(new_model, resumed, 2, seed=3)
    for a, b in zip(old_model.parameters(), new_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
