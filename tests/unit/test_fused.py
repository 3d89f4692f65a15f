"""r1lab's own training forward (`modeling/fused.py`) computes Hugging Face's function.

fp32: logits, log-probs, entropies and every parameter's gradient equal HF's to float rounding,
for Qwen2 (GQA, qkv bias, tied embeddings), Llama (no bias, untied head) and GPT-2 (LayerNorm,
GELU, learned positions, Conv1D). bf16 autocast: the
error against an fp32 reference is no larger than HF's own under autocast (RoPE and SwiGLU round
once here, at every op there). A GRPO update gives the parameters of the HF path. The C kernels'
values and gradients equal the PyTorch formulas. Unsupported models keep HF's forward.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from r1lab.modeling import build_char_tokenizer, build_model, fused, train_kernels
from r1lab.modeling.packing import pack_rows, packed_token_logprobs
from r1lab.modeling.train_state import make_optimizer, make_scheduler
from r1lab.rl.config import GRPOConfig
from r1lab.rl.grpo import Rollout, policy_update

TOK = build_char_tokenizer()
needs_kernels = pytest.mark.skipif(not train_kernels.available(), reason=f"kernels: {train_kernels.reason}")
pytestmark = needs_kernels


def ragged(n: int, seed: int, longest: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 120) for _ in range(rng.randint(2, longest))] for _ in range(n)]


def llama(seed: int = 0, **extra):
    torch.manual_seed(seed)
    options = dict(
        vocab_size=len(TOK), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**options, **extra}))


def hf_path(model):
    """A copy of `model` that `packed_token_logprobs` runs through HF's own forward."""
    other = copy.deepcopy(model)
    fused.disable(other)
    return other


def scores_and_grads(model, seqs, weights, temperature=1.0, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, entropy = packed_token_logprobs(
            model, seqs, row_len=max(map(len, seqs)), temperature=temperature
        )
    (logp.float() * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach().float(), entropy.detach().float(), grads


MODELS = {
    "qwen2": lambda: build_model("qwen2-4m", TOK, seed=1),
    "llama": llama,
    "llama-head-dim": lambda: llama(head_dim=32, num_key_value_heads=2),  # 4 heads of 32 in d = 64
    "gpt2": lambda: build_model("gpt2-1m", TOK, seed=1),
}


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_scores_and_gradients_equal_hf(make, temperature):
    model = make().train()
    assert fused.supported(model)
    seqs = ragged(13, seed=2)
    seqs[3][1] = seqs[5][0] = TOK.pad_token_id  # the padding row of the embedding gets no gradient
    assert len(pack_rows([len(s) for s in seqs], range(13), 40)) < 13  # sequences do share rows
    weights = torch.randn(len(seqs), max(map(len, seqs)) - 1, generator=torch.Generator().manual_seed(0))
    got = scores_and_grads(model, seqs, weights, temperature)
    want = scores_and_grads(hf_path(model), seqs, weights, temperature)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys() and len(got[2]) == len(list(model.parameters()))
    for name, g in want[2].items():
        torch.testing.assert_close(
            got[2][name], g, atol=1e-6 * float(g.abs().max()) + 1e-7, rtol=1e-4, msg=name
        )


@pytest.mark.parametrize("preset", ["qwen2-4m", "gpt2-1m"])
def test_bf16_error_is_no_larger_than_hf_autocast(preset):
    """Against fp32 HF as the truth: the fused bf16 log-probs and gradients err no more than HF's bf16."""
    model = build_model(preset, TOK, seed=3).train()
    seqs = ragged(12, seed=4)
    weights = torch.randn(len(seqs), max(map(len, seqs)) - 1, generator=torch.Generator().manual_seed(1))
    truth = scores_and_grads(hf_path(model), seqs, weights)
    fused_bf16 = scores_and_grads(model, seqs, weights, autocast=True)
    hf_bf16 = scores_and_grads(hf_path(model), seqs, weights, autocast=True)

    scored = truth[0] != 0  # the positions that are real tokens

    def err(run) -> tuple[float, float]:
        """mean |log-prob error|, and the gradient error's norm over all parameters relative to theirs"""
        logp = float((run[0] - truth[0]).abs()[scored].mean())
        num = sum(float((run[2][n] - g).norm() ** 2) for n, g in truth[2].items())
        return logp, (num / sum(float(g.norm() ** 2) for g in truth[2].values())) ** 0.5

    (f_logp, f_grad), (h_logp, h_grad) = err(fused_bf16), err(hf_bf16)
    assert 0 < f_logp < 0.01 and 0 < f_grad < 0.05  # bf16 rounding: there, and small
    # measured: qwen2-4m 0.00186 vs 0.00179 and 0.0087 vs 0.0086; gpt2-1m 0.00085 vs 0.00091, 0.0062 vs 0.0066
    assert f_logp <= 1.1 * h_logp and f_grad <= 1.1 * h_grad


def test_long_rows_take_sdpa_and_agree():
    model = build_model("qwen2-4m", TOK, seed=0).eval()
    seqs = [[(3 * i) % 100 + 5 for i in range(fused.MATH_ATTENTION_MAX_WIDTH + 20)], [7, 8, 9]]
    with torch.no_grad():
        got = packed_token_logprobs(model, seqs, row_len=len(seqs[0]) + 3)[0]
        want = packed_token_logprobs(hf_path(model), seqs, row_len=len(seqs[0]) + 3)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def grpo_rows(n: int, seed: int) -> list[Rollout]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, completion = rng.randint(4, 12), rng.randint(3, 20)
        ids = [rng.randrange(10, 200) for _ in range(prompt + completion)]
        rows.append(Rollout(ids, prompt, rng.choice((-1.0, 1.0)), [-1.0] * completion))
    return rows


@pytest.mark.parametrize(
    "rl",
    [
        {},
        {"kl_coef": 0.1},  # the reference model's log-probs through the own forward too (no grad)
        {"epochs": 2, "minibatches": 2, "old_logp": "recompute"},  # old log-probs recomputed, clipping
    ],
    ids=["plain", "kl", "two-epochs"],
)
def test_a_grpo_update_gives_the_hf_paths_update(rl):
    """The faster path gives the plain path's update (fp32, lr 1e-3): gradients at the first optimiser
    step within 1e-6 of each tensor's largest + 1e-4 relative, losses within 1e-6 relative, weights
    after all steps within a quarter of lr (AdamW divides by the gradient's own scale, so rounding in a
    near-zero gradient moves a weight by up to ~lr; seen: 3e-5)."""
    cfg = GRPOConfig.model_validate(
        {"model": "unused", "rl": {"lr": 1e-3, "precision": "fp32", "skip_zero_advantage": False, **rl}}
    )
    base = build_model("qwen2-4m", TOK, seed=5).train()
    results = []
    for model in (copy.deepcopy(base), hf_path(base)):
        ref = copy.deepcopy(model).eval() if cfg.rl.kl_coef else None
        opt = make_optimizer(model, cfg.rl.lr, 0.0, cfg.rl.betas)
        sched = make_scheduler(opt, "constant", 0, 10)
        first: list[torch.Tensor] = []

        def keep_first(*_, m=model, f=first) -> None:
            if not f:
                f.extend(p.grad.clone() for p in m.parameters())

        opt.register_step_pre_hook(keep_first)
        stats = [
            policy_update(model, ref, opt, sched, grpo_rows(16, 6), cfg, 0, random.Random(0))
            for _ in range(2)
        ]
        results.append((model, stats, first))
    (a, sa, ga), (b, sb, gb) = results
    assert fused.supported(a) and not fused.supported(b)  # not vacuous: the two paths did differ
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6 * float(y.abs().max()) + 1e-8, rtol=1e-4)
    for x, y in zip(sa, sb, strict=True):
        for key in ("loss", "entropy", "kl", "clip_frac"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    with torch.no_grad():
        moved = max(
            float((p - q).abs().max()) for p, q in zip(a.parameters(), base.parameters(), strict=True)
        )
        diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert moved > 1e-3 and diff < 2.5e-4


def test_unsupported_models_keep_hf_forward():
    exact_gelu = build_model("gpt2-1m", TOK, seed=0)
    exact_gelu.config.activation_function = "gelu"  # erf, not the tanh approximation
    assert not fused.supported(exact_gelu)
    assert not fused.supported(build_model("qwen2-4m", TOK, seed=0).double())
    scaled = build_model("qwen2-4m", TOK, seed=0)
    scaled.config.rope_parameters = {**scaled.config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    assert not fused.supported(scaled)
    dropout = build_model("gpt2-1m", TOK, seed=0)
    dropout.config.resid_pdrop = 0.1
    assert fused.supported(dropout.eval())  # evaluated: no dropout, the fused forward is exact
    assert not fused.supported(dropout.train())  # training would drop: HF's forward does that
    broken = build_model("qwen2-4m", TOK, seed=0)
    del broken.model.layers[0].mlp.gate_proj  # a structure this forward does not know
    assert not fused.supported(broken)


class Replaced(torch.nn.Module):
    """A layer standing in for a linear one (as a LoRA wrapper does): it has a `.weight`, and more."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.weight, self.bias = inner, inner.weight, inner.bias
        self.extra = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.inner(x) + self.extra


def test_what_changes_after_the_first_check_is_checked_again():
    model = build_model("qwen2-4m", TOK, seed=0).train()
    assert fused.supported(model)
    assert not fused.supported(copy.deepcopy(model).to(torch.bfloat16))  # another dtype
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fused.supported(model)  # only bf16 autocast (or none)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.supported(model)
    layer = model.model.layers[1].self_attn
    layer.v_proj = Replaced(layer.v_proj)  # changed in place: the structure is checked on every call
    assert not fused.supported(model)
    fresh = build_model("qwen2-4m", TOK, seed=0)
    fused.disable(fresh)
    assert not fused.supported(fresh)


def test_frozen_parameters_get_no_gradient_and_the_rest_hfs():
    model = build_model("qwen2-4m", TOK, seed=2).train()
    for p in (*model.model.embed_tokens.parameters(), *model.model.layers[0].parameters()):
        p.requires_grad_(False)
    seqs = ragged(6, seed=1)
    weights = torch.randn(len(seqs), max(map(len, seqs)) - 1, generator=torch.Generator().manual_seed(2))
    got, want = scores_and_grads(model, seqs, weights), scores_and_grads(hf_path(model), seqs, weights)
    assert got[2].keys() == want[2].keys()
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in got[2])
    for name, g in want[2].items():
        torch.testing.assert_close(got[2][name], g, atol=1e-6 * float(g.abs().max()) + 1e-7, rtol=1e-4)


def test_bad_kernel_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="x must be a contiguous CPU tensor"):
        train_kernels.rms_norm(torch.randn(4, 3).t(), torch.ones(4), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="the weight must be"):
        train_kernels.layer_norm(torch.randn(3, 4), torch.ones(5), None, 1e-5, torch.float32)
    with pytest.raises(ValueError, match="even number of columns"):
        train_kernels.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="qkv must be"):
        train_kernels.rope_scatter(
            torch.randn(3, 60), None, None, torch.arange(3), torch.arange(3), 3, 2, 1, 16
        )
    with pytest.raises(ValueError, match="cos must be"):
        cos = torch.ones(4, 6)  # D/2 = 8 columns expected
        train_kernels.rope_scatter(
            torch.randn(3, 64), cos, cos, torch.arange(3), torch.arange(3), 3, 2, 1, 16
        )
    with pytest.raises(ValueError, match="no tokens"):
        fused.fused_logits(build_model("qwen2-4m", TOK), [[[]]])


def test_a_model_whose_logits_disagree_is_refused(monkeypatch):
    """The per-model check compares with HF's logits: a forward that drifted from it is not used."""
    model = build_model("qwen2-4m", TOK, seed=0).train()
    real = fused.fused_logits
    monkeypatch.setattr(fused, "fused_logits", lambda m, rows: (real(m, rows)[0] * 1.01, real(m, rows)[1]))
    model.model.layers[0].eval()  # a submodule's own mode survives the check too
    assert not fused.supported(model)
    assert model.training and not model.model.layers[0].training


# ---- the C kernels against the PyTorch formulas, at sizes past the single-thread cut-off ----


def assert_all_close(got: list, want: list, tol: dict) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out.float().backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)))
    return [out.float()] + [x.grad.float() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_equal_pytorch(dtype, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the kernels are given
    gen = torch.Generator().manual_seed(0)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    x, w = torch.randn(300, 256, generator=gen) * 3, torch.randn(256, generator=gen)

    def ref_norm(x, w):
        return (w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))).to(dtype)

    assert_all_close(
        grads(lambda x, w: train_kernels.rms_norm(x, w, 1e-5, dtype), x, w), grads(ref_norm, x, w), tol
    )
    gu = (torch.randn(200, 2 * 300, generator=gen) * 5).to(dtype)

    def ref_swiglu(u):
        g, up = u.float().chunk(2, -1)
        return F.silu(g) * up

    assert_all_close(grads(train_kernels.swiglu, gu), grads(ref_swiglu, gu), tol)
    H, Hkv, D, T = 4, 2, 64, 150
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    ang = torch.rand(60, D // 2, generator=gen) * 20
    pos = torch.randint(0, 60, (T,), generator=gen)
    slot = torch.randperm(T + 30, generator=gen)[:T]
    for tables in ((ang.cos(), ang.sin()), (None, None)):  # RoPE, then a plain scatter (GPT-2)
        args = (*tables, pos, slot, T + 30, H, Hkv, D)
        got = grads(lambda q, a=args: train_kernels.rope_scatter(q, *a), qkv)
        want = grads(lambda q, a=args: train_kernels.rope_reference(q.float(), *a), qkv)
        assert_all_close(got, want, tol)


def test_rope_positions_out_of_range_are_an_error_not_a_crash():
    qkv = torch.randn(3, 4 * 16)
    cos = sin = torch.ones(4, 8)
    with pytest.raises(ValueError, match="out of range"):
        train_kernels.rope_scatter(
            qkv, cos, sin, torch.tensor([0, 1, 9]), torch.tensor([0, 1, 2]), 3, 2, 1, 16
        )
    with pytest.raises(ValueError, match="out of range"):
        train_kernels.rope_scatter(
            qkv, cos, sin, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), 3, 2, 1, 16
        )


def test_the_kernels_probe_passes_when_first_asked_under_no_grad(monkeypatch):
    """The trainer first asks from inside no_grad (old log-probs) or autocast: the probe must not fail."""
    monkeypatch.setattr(train_kernels, "_tried", False)
    monkeypatch.setattr(train_kernels, "_lib", None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert train_kernels.available(), train_kernels.reason
    monkeypatch.setattr(train_kernels, "_tried", False)
    monkeypatch.setattr(train_kernels, "_lib", None)
    with torch.inference_mode():
        assert train_kernels.available(), train_kernels.reason


def test_without_a_compiler_training_falls_back_to_hf_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("R1LAB_CACHE", str(tmp_path))  # no library built before
    monkeypatch.setattr(train_kernels, "_tried", False)
    monkeypatch.setattr(train_kernels, "_lib", None)
    with pytest.warns(RuntimeWarning, match="Hugging Face's forward"):
        assert not train_kernels.available()
    assert "could not build" in train_kernels.reason
    model = build_model("qwen2-4m", TOK, seed=0)
    assert not fused.supported(model)
    seqs = ragged(5, seed=0)
    got = packed_token_logprobs(model, seqs, row_len=40)[0]  # HF's forward, the same numbers
    monkeypatch.undo()
    torch.testing.assert_close(got, packed_token_logprobs(model, seqs, row_len=40)[0], atol=1e-5, rtol=1e-5)
