"""fp32 linear layers through oneDNN: the values and gradients of nn.Linear / Conv1D, nothing else changed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from r1lab.modeling import build_char_tokenizer, build_model, onednn

needs_onednn = pytest.mark.skipif(onednn._mkldnn() is None, reason="PyTorch built without oneDNN")
TOK = build_char_tokenizer()


def grads_of(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of module(x) for the output gradient g."""
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return [y.detach(), x.grad, *(p.grad.clone() for p in module.parameters())]


@needs_onednn
@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "conv1d"])
def test_layer_forward_and_gradients_equal_the_original(kind):
    torch.manual_seed(0)
    plain = {
        "linear": nn.Linear(48, 80),
        "linear-nobias": nn.Linear(48, 80, bias=False),
        "conv1d": Conv1D(80, 48),
    }[kind]
    fast = copy.deepcopy(plain)
    fast.__class__ = onednn._SWAPS[type(plain)]
    x, g = torch.randn(3, 7, 48), torch.randn(3, 7, 80)
    for got, want in zip(grads_of(fast, x, g), grads_of(plain, x, g), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a drop-in: the output may be modified in place, as nn.Linear's may
    y = fast(x.requires_grad_(True))
    y.add_(1.0).sum().backward()
    # outside fp32-on-CPU (here bf16 autocast) the original forward runs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16


@needs_onednn
@pytest.mark.parametrize("preset", ["qwen2-4m", "gpt2-1m"])
def test_switched_model_trains_like_the_original(preset, monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_faster", True)  # switch whatever this machine measures
    plain = build_model(preset, TOK, seed=0)
    fast = copy.deepcopy(plain)
    n = onednn.use_onednn_linears(fast)
    assert n > 0 and set(fast.state_dict()) == set(plain.state_dict())
    ids = torch.randint(5, 100, (2, 12))
    for m in (plain, fast):
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert onednn.use_onednn_linears(copy.deepcopy(fast)) == 0  # nothing left to switch, copies work
    fast.save_pretrained(tmp_path)  # the checkpoint is an ordinary one
    again = type(plain).from_pretrained(tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_nothing_is_switched_where_onednn_does_not_win(monkeypatch):
    monkeypatch.setattr(onednn, "_faster", False)
    model = build_model("qwen2-4m", TOK, seed=0)
    assert onednn.use_onednn_linears(model) == 0
    assert all(type(m) is not onednn.OneDNNLinear for m in model.modules())


def test_the_probe_answers_once_and_checks_the_results(monkeypatch):
    monkeypatch.setattr(onednn, "_faster", None)
    first = onednn.onednn_is_faster()
    assert isinstance(first, bool) and onednn._faster is first
    monkeypatch.setattr(onednn, "_faster", None)
    monkeypatch.setattr(onednn, "_mm", lambda x2, w, b=None: torch.zeros(x2.shape[0], w.shape[0]))
    assert onednn.onednn_is_faster() is False  # wrong numbers are never used, however fast


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_packed_linear_equals_linear_values_and_gradients(dtype, transposed):
    """Two weights concatenated (q|k|v style) with biases, or one GPT-2 style [in, out] weight."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 12)] if transposed else [(6, 12), (10, 12)]
    ws = [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]
    bs = [torch.randn(s[1] if transposed else s[0], generator=gen, requires_grad=True) for s in shapes]
    x = torch.randn(5, 12 if not transposed else 8, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(5, sum(s[1] if transposed else s[0] for s in shapes), generator=gen)
    owner = nn.Module()
    got = onednn.packed_linear(x, owner, "w", ws, bs, transposed=transposed)
    got.float().backward(g)
    grads = [t.grad.clone() for t in (x, *ws, *bs)]
    for t in (x, *ws, *bs):
        t.grad = None
    w = torch.cat([p.t() if transposed else p for p in ws])
    want = F.linear(x.float(), w, torch.cat(bs)).to(dtype)
    want.float().backward(g)
    tol = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    for a, t in zip(grads, (x, *ws, *bs), strict=True):
        torch.testing.assert_close(a.float(), t.grad.float(), **tol)


@needs_onednn
def test_packs_are_reused_only_inside_fixed_weights():
    """Fused AdamW updates weights without bumping their version: outside a `fixed_weights` block
    every call packs afresh, inside one the pack is made once; a module with packs deep-copies."""
    w = nn.Parameter(torch.randn(4, 3))
    owner, x = nn.Module(), torch.randn(2, 3)
    opt = torch.optim.AdamW([w], lr=0.5, fused=True)
    before = onednn.packed_linear(x, owner, "w", [w])
    w.grad = torch.ones_like(w)
    opt.step()  # in place, version counter unchanged
    torch.testing.assert_close(onednn.packed_linear(x, owner, "w", [w]), x @ w.detach().t())
    assert not torch.allclose(before, x @ w.detach().t())
    with onednn.fixed_weights():
        onednn.packed_linear(x, owner, "w", [w])
        first = owner._r1lab_packs["w"]
        onednn.packed_linear(x, owner, "w", [w])
        assert owner._r1lab_packs["w"] is first
        copy.deepcopy(owner)  # oneDNN's packed tensors are not copied
    assert not owner._r1lab_packs  # dropped when the block ends
