"""The optional C decode kernels: same numbers as the PyTorch path they replace, and a clean fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rollout import TOK, build

from r1lab.rollout import CPUEngine, SamplingParams, kernels, lean, native
from r1lab.rollout.sampling import RowParams, derive_key, sample

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason}")
CLOSE = dict(atol=1e-5, rtol=1e-4)


def _attend_case(heads, kv_heads, dim, rope, seed=0):
    """A fused projection, a 3-layer cache like the engine's and ragged positions."""
    gen = torch.Generator().manual_seed(seed)
    rows, t_max = 6, 50
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen)
    cache = torch.randn(2, 3, rows + 2, kv_heads, t_max, dim, generator=gen)  # [K/V, L, S, H_kv, T, D]
    pos = torch.tensor([0, 40, 16, 40, 1, 29])
    tables = (torch.randn(t_max, dim // 2, generator=gen), torch.randn(t_max, dim // 2, generator=gen))
    return qkv, cache, pos, tables if rope else (None, None)


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "rope"),
    [
        (4, 2, 64, True),
        (3, 3, 64, False),
        (2, 1, 128, True),
        (8, 2, 16, True),
        (3, 1, 80, True),
        (2, 2, 8, False),
    ],
)
def test_attend_matches_pytorch_and_writes_the_same_cache(heads, kv_heads, dim, rope):
    qkv, cache, pos, (cos, sin) = _attend_case(heads, kv_heads, dim, rope)
    rot = (cos[pos][:, None], sin[pos][:, None]) if rope else None  # what kernels._rotation gives
    ref_cache = cache.clone()
    ref = kernels._attend(qkv, rot, pos, ref_cache[0, 1], ref_cache[1, 1], heads, kv_heads, 0.125)
    got = native.attend(qkv, cos, sin, pos, cache[0, 1], cache[1, 1], heads, kv_heads, 0.125)
    torch.testing.assert_close(got, ref, **CLOSE)
    torch.testing.assert_close(cache, ref_cache, **CLOSE)  # the new keys/values, nothing else


@needs_kernel
def test_attend_ignores_positions_past_each_row():
    qkv, cache, pos, (cos, sin) = _attend_case(4, 2, 16, True)
    k, v = cache[0, 0], cache[1, 0]
    before = native.attend(qkv, cos, sin, pos, k, v, 4, 2, 1.0)
    k[0, :, 1:], v[0, :, 1:] = float("nan"), float("nan")  # row 0 (position 0) must never read these
    k[2, :, 17:], v[2, :, 17:] = float("nan"), float("nan")  # row 2 is at position 16
    torch.testing.assert_close(native.attend(qkv, cos, sin, pos, k, v, 4, 2, 1.0), before)


@needs_kernel
def test_attend_refuses_bad_positions_and_shapes_without_writing():
    qkv, cache, pos, (cos, sin) = _attend_case(4, 2, 16, True)
    before = cache.clone()
    for bad in (torch.tensor([0, 1, 2, 3, 4, -1]), torch.tensor([0, 1, 2, 3, 4, 50])):
        with pytest.raises(ValueError, match="position"):
            native.attend(qkv, cos, sin, bad, cache[0, 0], cache[1, 0], 4, 2, 1.0)
    with pytest.raises(ValueError, match="head layout"):
        native.attend(qkv, cos, sin, pos, cache[0, 0], cache[1, 0], 2, 2, 1.0)
    with pytest.raises(ValueError, match="position"):  # past the RoPE table, inside the cache
        native.attend(qkv, cos[:20], sin[:20], pos, cache[0, 0], cache[1, 0], 4, 2, 1.0)
    with pytest.raises(ValueError, match="contiguous"):  # a broadcast table would be read past its storage
        native.attend(qkv, cos, sin[:1].expand_as(sin), pos, cache[0, 0], cache[1, 0], 4, 2, 1.0)
    with pytest.raises(ValueError, match="one position per row"):
        native.attend(qkv, cos, sin, pos[:3], cache[0, 0], cache[1, 0], 4, 2, 1.0)
    with pytest.raises(TypeError, match="fp32"):
        native.attend(qkv.double(), cos, sin, pos, cache[0, 0], cache[1, 0], 4, 2, 1.0)
    assert torch.equal(cache, before)


@needs_kernel
@pytest.mark.parametrize("layer_norm", [False, True])
def test_add_norm_adds_in_place_then_normalises(layer_norm):
    gen = torch.Generator().manual_seed(1)
    x, delta = torch.randn(5, 96, generator=gen) * 3, torch.randn(5, 96, generator=gen)
    w = torch.randn(96, generator=gen)
    b = torch.randn(96, generator=gen) if layer_norm else None
    want_x = x + delta
    got = native.add_norm(x, delta, w, b, 1e-6)
    torch.testing.assert_close(x, want_x)  # the residual stream is updated in place
    torch.testing.assert_close(got, kernels._norm(want_x, w, b, 1e-6), **CLOSE)
    torch.testing.assert_close(native.add_norm(x.clone(), None, w, b, 1e-6), got, **CLOSE)
    with pytest.raises(ValueError, match=r"weight \(and bias\) \[d\]"):
        native.add_norm(x, None, w[:10], b, 1e-6)


@needs_kernel
def test_activations_match_pytorch_over_a_wide_range():
    u = torch.linspace(-120, 120, 4 * 2 * 1001).reshape(4, 2 * 1001)  # saturates exp both ways
    gate, up = u.chunk(2, dim=-1)
    torch.testing.assert_close(native.swiglu(u.contiguous()), F.silu(gate) * up, **CLOSE)
    want = F.gelu(u, approximate="tanh")
    torch.testing.assert_close(native.gelu_tanh_(u.clone()), want, **CLOSE)
    small = torch.linspace(-3, 3, 601)
    torch.testing.assert_close(native.gelu_tanh_(small.clone()), F.gelu(small, approximate="tanh"), **CLOSE)


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "rope"), [(4, 2, 64, True), (3, 3, 16, False), (2, 1, 128, True)]
)
@pytest.mark.parametrize("bf16", [False, True])
def test_prefill_attend_is_causal_within_each_packed_prompt(heads, kv_heads, dim, rope, bf16):
    gen = torch.Generator().manual_seed(4)
    lens = [5, 1, 12, 3]
    pos = torch.cat([torch.arange(t) for t in lens])
    n = sum(lens)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=gen)
    qkv = qkv.bfloat16() if bf16 else qkv
    cos, sin = torch.randn(20, dim // 2, generator=gen), torch.randn(20, dim // 2, generator=gen)
    tables = (cos, sin) if rope else (None, None)
    rot = (cos[pos][:, None], sin[pos][:, None]) if rope else None
    want, k, v = kernels._prefill_attend(qkv.float(), rot, lens, heads, kv_heads, 0.3)
    out_dtype = torch.bfloat16 if bf16 else torch.float32
    got, got_k, got_v = native.prefill_attend(qkv, *tables, pos, heads, kv_heads, 0.3, out_dtype)
    assert got.dtype == out_dtype and got_k.dtype == got_v.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, **(dict(atol=1e-2, rtol=1e-2) if bf16 else CLOSE))
    torch.testing.assert_close(got_k, k, **CLOSE)
    assert torch.equal(got_v, v)
    # a token attends to its own prompt only: changing the last prompt leaves the others' outputs alone
    other = qkv.clone()
    other[-3:] = 7
    moved, _, _ = native.prefill_attend(other, *tables, pos, heads, kv_heads, 0.3, out_dtype)
    assert torch.equal(moved[:-3], got[:-3])


@needs_kernel
def test_prefill_attend_refuses_positions_that_do_not_restart_per_prompt():
    qkv = torch.randn(4, 4 * 16)
    bad_positions = ([1, 2, 3, 4], [0, 1, -1, 0], [0, 1, 2, 30], [0, 1, 0, 3], [0, 1, 1, 1], [0, 1, 2, 1])
    for bad in map(torch.tensor, bad_positions):
        with pytest.raises(ValueError, match="restart at 0"):
            native.prefill_attend(qkv, torch.zeros(8, 8), torch.zeros(8, 8), bad, 2, 1, 1.0)
    with pytest.raises(ValueError, match="one position per token"):
        native.prefill_attend(qkv, None, None, torch.tensor([0, 1]), 2, 1, 1.0)


@needs_kernel
def test_bf16_inputs_and_outputs_round_as_torch_does():
    """The kernels read a matmul's bf16 output and write its bf16 input: the same numbers as
    widening to fp32, computing, and `.to(torch.bfloat16)` (round to nearest even)."""
    gen = torch.Generator().manual_seed(5)
    # silu(g) == g exactly in fp32 for g >= 40 (exp(-40) vanishes against 1), so the output is the
    # fp32 product g * up and only its rounding to bf16 is tested; ties included by construction
    gate = 40 + torch.randint(0, 64, (4, 300), generator=gen).float()
    up = torch.randn(4, 300, generator=gen)
    up[0, :8] = torch.tensor([1.00390625, 1.01171875, -1.00390625, 3.0e38, -3.0e38, 1e-40, 0.0, -0.0])
    u = torch.cat([gate, up], dim=1)
    want = (gate * up).to(torch.bfloat16)
    got = native.swiglu(u, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    nan = native.swiglu(torch.tensor([[41.0, float("nan")]]), torch.bfloat16)
    assert torch.isnan(nan).all()
    # bf16 in, fp32 out is exact widening
    u16 = (torch.randn(3, 64, generator=gen) * 50).bfloat16()
    g16, up16 = u16.float().chunk(2, dim=1)
    torch.testing.assert_close(native.swiglu(u16), F.silu(g16) * up16, **CLOSE)
    x, delta = torch.randn(3, 96, generator=gen), torch.randn(3, 96, generator=gen).bfloat16()
    w = torch.randn(96, generator=gen)
    want_x = x + delta.float()
    h = native.add_norm(x, delta, w, None, 1e-6, torch.bfloat16)
    torch.testing.assert_close(x, want_x, atol=0, rtol=0)  # the residual stream stays fp32
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), kernels._norm(want_x, w, None, 1e-6), atol=1e-2, rtol=1e-2)
    with pytest.raises(TypeError, match="out_dtype"):
        native.add_norm(x, None, w, None, 1e-6, torch.float16)
    with pytest.raises(TypeError, match="fp32"):
        native.add_norm(x.bfloat16(), None, w, None, 1e-6)  # the residual stream must be fp32


@needs_kernel
def test_attend_takes_a_bf16_projection_and_writes_a_bf16_output():
    qkv, cache, pos, (cos, sin) = _attend_case(4, 2, 64, True)
    qkv16 = qkv.bfloat16()
    rot = (cos[pos][:, None], sin[pos][:, None])
    ref_cache = cache.clone()
    ref = kernels._attend(qkv16.float(), rot, pos, ref_cache[0, 1], ref_cache[1, 1], 4, 2, 0.125)
    got = native.attend(qkv16, cos, sin, pos, cache[0, 1], cache[1, 1], 4, 2, 0.125, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and cache.dtype == torch.float32
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(cache, ref_cache, **CLOSE)


@needs_kernel
def test_sampler_kernel_draws_the_tokens_pytorch_draws():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 300, generator=gen) * 3
    temps = [0.0 if i % 7 == 0 else 0.3 + (i % 5) * 0.4 for i in range(500)]  # greedy rows too
    rows = RowParams.build(temps, [1.0] * 500, [derive_key(11, i) for i in range(500)])
    counters = torch.arange(500) * 3
    want_tokens, want_logp = sample(logits, rows, counters, fused=False)
    tokens, logp = sample(logits, rows, counters)  # the kernel: no row has top-p
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logp, want_logp, **CLOSE)
    with pytest.raises(ValueError, match="row settings"):
        native.sample(logits, rows.temperature[:3], rows.keys, counters)


@needs_kernel
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_draws_the_same_tokens_with_and_without_the_kernels(arch, temperature, dtype):
    engine = CPUEngine(build(arch), TOK, dtype=dtype)
    prompts = ["12+7=", "a much longer prompt, to make the rows ragged:", "x"]
    params = SamplingParams(temperature=temperature, max_tokens=24, seed=5)
    with_kernel = engine.generate(prompts, 2, params)
    engine.native = False
    without = engine.generate(prompts, 2, params)
    assert [c.token_ids for c in with_kernel] == [c.token_ids for c in without]
    # bf16: a matmul input one rounding step apart moves these wide logits (+-30) by a few 1e-2
    tol = dict(atol=1e-4, rtol=0) if dtype == "float32" else dict(atol=0.1, rtol=0.05)
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), **tol)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The module as if never used in this process, building into an empty cache."""
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "reason", None)
    monkeypatch.setenv("R1LAB_CACHE", str(tmp_path))
    return native


def test_disabled_by_environment_falls_back_to_pytorch(fresh_native, monkeypatch):
    monkeypatch.setenv("R1LAB_NATIVE", "0")
    assert not fresh_native.available()
    assert "R1LAB_NATIVE=0" in fresh_native.reason
    with pytest.raises(RuntimeError, match="R1LAB_NATIVE=0"):
        fresh_native.swiglu(torch.randn(2, 8))
    model = build("qwen2")
    lm = lean.lean_from_hf(model, torch.float32)
    lean.ensure_rope(lm, 8)
    cache = torch.zeros(lm.n_layers, 1, lm.n_kv_heads, 8, lm.head_dim)
    with torch.inference_mode():
        got = kernels.decode_step(lm, cache, cache.clone(), torch.tensor([5]), torch.tensor([0]), 1)
        ref = model(torch.tensor([[5]])).logits[0, -1]
    torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=0)


def test_missing_compiler_is_a_reason_and_a_warning_not_an_error(fresh_native, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="could not build.*PyTorch path"):
        assert not fresh_native.available()
    assert "could not build" in fresh_native.reason


@needs_kernel  # (without a compiler the reason is the build, not the probe)
def test_a_kernel_that_disagrees_with_pytorch_is_not_used(fresh_native, monkeypatch):
    wrong = kernels._norm
    monkeypatch.setattr(kernels, "_norm", lambda x, w, b, eps: wrong(x, w, b, eps) + 1e-2)
    with pytest.warns(RuntimeWarning, match="disagreed"):
        assert not fresh_native.available()
    assert "disagreed" in fresh_native.reason and "add_norm" in fresh_native.reason
