"""The optional C decode-attention kernel: same numbers as the PyTorch path, and a clean fallback."""

from __future__ import annotations

import pytest
import torch
from test_rollout import TOK, build

from r1lab.rollout import CPUEngine, SamplingParams, kernels, native

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.reason}")


@needs_kernel
@pytest.mark.parametrize(("heads", "group", "dim"), [(3, 1, 64), (2, 2, 64), (2, 4, 16), (1, 3, 80)])
def test_kernel_matches_pytorch_on_the_engines_cache_views(heads, group, dim):
    gen = torch.Generator().manual_seed(heads * 100 + group)
    rows, t_max = 6, 50
    cache = torch.randn(2, 3, rows, heads, t_max, dim, generator=gen)  # [K/V, L, S, H_kv, T_max, D]
    lens = torch.tensor([1, 41, 17, 41, 2, 30])
    n_ctx = int(lens.max())
    keys, vals = cache[0, 1, :, :, :n_ctx], cache[1, 1, :, :, :n_ctx]  # strided, as in decode_step
    q = torch.randn(rows, heads, group, dim, generator=gen)
    got = native.decode_attention(q, keys, vals, lens, 0.125)
    torch.testing.assert_close(got, native.reference(q, keys, vals, lens, 0.125), atol=1e-5, rtol=1e-4)


@needs_kernel
def test_kernel_ignores_keys_past_each_rows_length():
    q, keys, vals = torch.randn(2, 1, 1, 8), torch.randn(2, 1, 10, 8), torch.randn(2, 1, 10, 8)
    lens = torch.tensor([4, 10])
    before = native.decode_attention(q, keys, vals, lens, 1.0)
    keys[0, :, 4:] = float("nan")  # row 0 must never read these
    vals[0, :, 4:] = float("nan")
    torch.testing.assert_close(native.decode_attention(q, keys, vals, lens, 1.0), before)


@needs_kernel
def test_bad_lengths_are_refused():
    q, kv = torch.randn(2, 1, 1, 8), torch.randn(2, 1, 5, 8)
    for lens in (torch.tensor([0, 3]), torch.tensor([3, 6])):
        with pytest.raises(ValueError, match="lens"):
            native.decode_attention(q, kv, kv, lens, 1.0)


@needs_kernel
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_engine_greedy_tokens_are_the_same_with_and_without_the_kernel(arch):
    engine = CPUEngine(build(arch), TOK)
    prompts = ["12+7=", "a much longer prompt, to make the rows ragged:", "x"]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    with_kernel = engine.generate(prompts, 2, params)
    engine._backend.lm.native = False
    without = engine.generate(prompts, 2, params)
    assert [c.token_ids for c in with_kernel] == [c.token_ids for c in without]
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The module as if never used in this process, building into an empty cache."""
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_fn", None)
    monkeypatch.setattr(native, "reason", None)
    monkeypatch.setenv("R1LAB_CACHE", str(tmp_path))
    return native


def test_disabled_by_environment_falls_back_to_pytorch(fresh_native, monkeypatch):
    monkeypatch.setenv("R1LAB_NATIVE", "0")
    assert not fresh_native.available()
    assert "R1LAB_NATIVE=0" in fresh_native.reason
    q, kv = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 4, 8)
    assert fresh_native.decode_attention(q, kv, kv, torch.tensor([4]), 1.0) is None
    model = build("qwen2")
    lm = kernels.lean_from_hf(model, torch.float32)
    kernels.ensure_rope(lm, 8)
    cache = torch.zeros(lm.n_layers, 1, lm.n_kv_heads, 8, lm.head_dim)
    with torch.inference_mode():
        got = kernels.decode_step(lm, cache, cache.clone(), torch.tensor([5]), torch.tensor([0]), 1)
        ref = model(torch.tensor([[5]])).logits[0, -1]
    torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=0)


def test_missing_compiler_is_a_reason_not_an_error(fresh_native, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert not fresh_native.available()
    assert "could not build" in fresh_native.reason
