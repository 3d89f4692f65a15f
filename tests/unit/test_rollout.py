"""The CPU rollout engine against Hugging Face: same logits, same greedy tokens, honest log-probs.

Tiny random models (two layers, width 64) built from transformers configs and a character tokenizer
built here; a large init scale spreads the logits so greedy argmax has no near-ties.
"""

from __future__ import annotations

import string
import threading

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from r1lab.config import R1labError
from r1lab.rollout import CPUEngine, SamplingParams, kernels, lean, make_sampler
from r1lab.rollout.detok import TextStream
from r1lab.rollout.sampling import RowParams, sample, top_p_mask

SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["hello", "a much longer prompt than the others", [{"role": "user", "content": "12+7=?"}]]


def char_tokenizer():
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate([*SPECIALS, "<think>", "</think>", "<unk>", *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)
    tk.add_tokens(["<think>", "</think>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", chat_template=TEMPLATE
    )


TOK = char_tokenizer()
V = len(TOK)


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, initializer_range=0.3, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    if arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
        return Qwen2ForCausalLM(cfg).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)).eval()
    cfg = GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, **common,
    )  # fmt: skip
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def lean_model(request):
    return build(request.param)


def hf_greedy(model, prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """HF generate, left-padded batch, cut after EOS."""
    t = max(map(len, prompt_ids))
    inp = torch.tensor([[0] * (t - len(p)) + p for p in prompt_ids])
    mask = (inp != 0).long() | (
        torch.arange(t)[None] >= torch.tensor([t - len(p) for p in prompt_ids])[:, None]
    )
    out = model.generate(
        input_ids=inp,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        pad_token_id=0,
        eos_token_id=1,
    )
    rows = []
    for r in out[:, t:].tolist():
        rows.append(r[: r.index(1) + 1] if 1 in r else r)
    return rows


# --------------------------------------------------------------------------- lean forward


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_prefill_and_decode_match_hf_logits(lean_model, fused, dtype):
    """fp32 to float rounding; bf16 matmuls (fp32 around them) against HF under bf16 autocast, the
    same arithmetic, to bf16 rounding (logits here span about +-30)."""
    lm = lean.lean_from_hf(lean_model, dtype)
    assert isinstance(lm, lean.LeanModel) and lm.dtype == torch.float32 and lm.mm_dtype == dtype
    tol = dict(atol=1e-4, rtol=0) if dtype == torch.float32 else dict(atol=0.25, rtol=0.02)
    seqs = [torch.randint(4, V, (t,)) for t in (5, 11, 2)]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        ref = [lean_model(s[None]).logits[0].float() for s in seqs]  # [t, V] each
    with torch.inference_mode():
        lens = [len(s) - 1 for s in seqs]
        logits, kv = kernels.prefill(lm, torch.cat([s[:-1] for s in seqs]), lens, fused)
        for i in range(3):
            torch.testing.assert_close(logits[i], ref[i][-2], **tol)
        shape = (lm.n_layers, 4, lm.n_kv_heads, 16, lm.head_dim)
        k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
        lean.ensure_rope(lm, 16)
        start = 0
        for row, s in enumerate(seqs):
            t = len(s) - 1
            for layer, (k, v) in enumerate(kv):
                k_cache[layer, row, :, :t] = k[start : start + t].transpose(0, 1)
                v_cache[layer, row, :, :t] = v[start : start + t].transpose(0, 1)
            start += t
        pos = torch.tensor([len(s) - 1 for s in seqs])
        out = kernels.decode_step(
            lm, k_cache, v_cache, torch.stack([s[-1] for s in seqs]), pos, int(pos.max()) + 1, fused
        )
    for i in range(3):
        torch.testing.assert_close(out[i], ref[i][-1], **tol)


def test_unsupported_architecture_falls_back_to_hf():
    assert isinstance(lean.lean_from_hf(build("neox"), torch.float32), str)
    assert CPUEngine(build("neox"), TOK).fallback_reason is not None


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "neox"])
def test_greedy_equals_hf_generate_with_ragged_prompts(arch):
    model = build(arch)
    engine = CPUEngine(model, TOK)
    outs = engine.generate(PROMPTS, 2, SamplingParams(temperature=0, max_tokens=16))
    ref = hf_greedy(model, [engine.encode(p) for p in PROMPTS], 16)
    assert [o.token_ids for o in outs] == [r for r in ref for _ in range(2)]
    assert [o.prompt_index for o in outs] == [0, 0, 1, 1, 2, 2]
    assert all(o.finish_reason == ("stop" if o.token_ids[-1] == 1 else "length") for o in outs)
    assert outs[4].prompt_token_ids == engine.encode(PROMPTS[2])
    assert sum(len(o.token_ids) for o in outs) > 12  # the comparison covered real decoding


def test_logprobs_are_raw_policy_logprobs(lean_model):
    engine = CPUEngine(lean_model, TOK)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, seed=3)
    for o in engine.generate(PROMPTS[:2], 3, params):
        ids = torch.tensor([o.prompt_token_ids + o.token_ids])
        with torch.inference_mode():
            logp = torch.log_softmax(lean_model(ids).logits[0].float(), -1)  # [T, V]
        start = len(o.prompt_token_ids)
        expect = logp[start - 1 : -1].gather(1, ids[0, start:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(o.logprobs), expect, atol=1e-4, rtol=0)


def test_eos_from_generation_config_and_max_tokens():
    model = build("qwen2")
    free = CPUEngine(model, TOK).generate(["hello"], 1, SamplingParams(temperature=0, max_tokens=12))[0]
    assert free.finish_reason == "length" or free.token_ids[-1] == 1
    target = free.token_ids[3]
    first = free.token_ids.index(target)
    model.generation_config.eos_token_id = [1, target]
    out = CPUEngine(model, TOK).generate(["hello"], 1, SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    short = CPUEngine(model, TOK).generate(["hello"], 1, SamplingParams(temperature=0, max_tokens=2))[0]
    assert len(short.token_ids) == min(2, first + 1)


def test_stop_string_cut_from_text_and_tokens():
    model = build("gpt2")
    model.generation_config.eos_token_id = None
    engine = CPUEngine(model, TOK)
    engine.eos_ids = frozenset()  # run to max_tokens so the text is long
    full = engine.generate(["abc"], 1, SamplingParams(temperature=0, max_tokens=20))[0]
    stop = full.text[6:8]
    cut = full.text.index(stop)
    out = engine.generate(["abc"], 1, SamplingParams(temperature=0, max_tokens=20, stop=(stop, "zzzz")))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[:cut] and len(out.logprobs) == cut  # one token per char


def test_tiny_top_p_equals_greedy_and_seed_reproduces(lean_model):
    engine = CPUEngine(lean_model, TOK)
    greedy = engine.generate(PROMPTS, 1, SamplingParams(temperature=0, max_tokens=16))
    nucleus = engine.generate(PROMPTS, 1, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=16, seed=1))
    assert [o.token_ids for o in nucleus] == [o.token_ids for o in greedy]
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=5)
    a, b = engine.generate(PROMPTS, 4, p), engine.generate(PROMPTS, 4, p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_tokens=16, seed=6))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    assert len({tuple(o.token_ids) for o in a[:4]}) > 1  # samples of one prompt differ


def test_prompt_prefilled_once_and_small_max_batch_is_equivalent():
    model = build("qwen2")
    engine = CPUEngine(model, TOK, max_batch=3)
    calls = []
    prefill = engine._backend.prefill
    engine._backend.prefill = lambda prompts, *a: calls.append(len(prompts)) or prefill(prompts, *a)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=11)
    small = engine.generate(PROMPTS, 4, params)
    assert sum(calls) == len(PROMPTS)  # 12 samples, 3 prompts computed
    big = CPUEngine(model, TOK).generate(PROMPTS, 4, params)
    assert [o.token_ids for o in small] == [o.token_ids for o in big]


def test_bfloat16_generates():
    outs = CPUEngine(build("qwen2"), TOK, dtype="bfloat16").generate(PROMPTS, 2, SamplingParams(max_tokens=8))
    assert len(outs) == 6 and all(0 < len(o.token_ids) <= 8 for o in outs)
    assert all(lp <= 0 for o in outs for lp in o.logprobs)


def test_bad_input_is_a_one_line_error():
    engine = CPUEngine(build("gpt2"), TOK)
    with pytest.raises(R1labError, match="top_p"):
        engine.generate(["x"], 1, SamplingParams(top_p=0))
    with pytest.raises(R1labError, match="takes 256"):
        engine.add_request("r", [5] * 300, SamplingParams())
    with pytest.raises(R1labError, match="dtype"):
        CPUEngine(build("gpt2"), TOK, dtype="float16")


# --------------------------------------------------------------------------- step API


def run_alone(engine, prompt_ids, params):
    engine.add_request("solo", prompt_ids, params)
    toks = []
    while engine.has_unfinished():
        toks += [o.token_id for o in engine.step() if o.request_id == "solo"]
    return toks


def test_request_joining_mid_generation_gets_same_greedy_tokens(lean_model):
    engine = CPUEngine(lean_model, TOK)
    engine.eos_ids = frozenset()
    greedy = SamplingParams(temperature=0, max_tokens=12)
    late_ids = engine.encode(PROMPTS[1])
    alone = run_alone(engine, late_ids, greedy)
    engine.add_request("a", engine.encode(PROMPTS[0]), SamplingParams(temperature=1.0, max_tokens=30, seed=1))
    engine.add_request("b", engine.encode(PROMPTS[2]), greedy)
    got: dict[str, list[int]] = {}
    for step in range(40):
        if step == 5:
            engine.add_request("late", late_ids, greedy)
        for o in engine.step():
            got.setdefault(o.request_id, []).append(o.token_id)
    assert got["late"] == alone
    assert not engine.has_unfinished()


def test_seeded_request_is_independent_of_batch_company(lean_model):
    engine = CPUEngine(lean_model, TOK)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=42)
    ids = engine.encode(PROMPTS[0])
    alone = run_alone(engine, ids, params)
    engine.add_request("other", engine.encode(PROMPTS[1]), SamplingParams(temperature=1.0, max_tokens=6))
    engine.step()
    assert run_alone(engine, ids, params) == alone
    first = engine.generate([PROMPTS[0]], 1, params)[0]
    assert first.token_ids == alone[: len(first.token_ids)]  # generate() sample 0 uses the same stream


def test_abort_frees_the_slot_at_once():
    engine = CPUEngine(build("qwen2"), TOK, max_batch=1)
    engine.eos_ids = frozenset()
    params = SamplingParams(temperature=0, max_tokens=50)
    engine.add_request("a", engine.encode("first"), params)
    engine.add_request("b", engine.encode("second"), params)
    assert {o.request_id for o in engine.step()} == {"a"}
    engine.abort("a")
    assert len(engine._rows) == 0 and engine.has_unfinished()
    assert {o.request_id for o in engine.step()} == {"b"}
    engine.abort("b")
    engine.abort("unknown")
    assert not engine.has_unfinished() and engine.step() == []


def test_requests_added_from_another_thread_while_stepping():
    engine = CPUEngine(build("qwen2"), TOK)
    engine.eos_ids = frozenset()
    greedy = SamplingParams(temperature=0, max_tokens=8)
    ids = [engine.encode(p) for p in PROMPTS]
    alone = [run_alone(engine, x, greedy) for x in ids]
    got: dict[str, list[int]] = {}
    done = threading.Event()

    def worker():
        while not done.is_set() or engine.has_unfinished():
            for o in engine.step():
                got.setdefault(o.request_id, []).append(o.token_id)

    thread = threading.Thread(target=worker)
    thread.start()
    for i, x in enumerate(ids):
        engine.add_request(f"r{i}", x, greedy)
    done.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert [got[f"r{i}"] for i in range(len(ids))] == alone


def test_streamed_deltas_add_up_to_the_text_and_hide_stop_prefixes():
    model = build("gpt2")
    engine = CPUEngine(model, TOK)
    engine.eos_ids = frozenset()
    full = engine.generate(["abc"], 1, SamplingParams(temperature=0, max_tokens=20))[0].text
    stop = full[8:11]
    engine.add_request("s", engine.encode("abc"), SamplingParams(temperature=0, max_tokens=20, stop=(stop,)))
    deltas, last = [], None
    while engine.has_unfinished():
        (last,) = engine.step()
        deltas.append(last.text_delta)
        assert stop[:2] not in "".join(deltas) or full.index(stop[:2]) < full.index(stop)
    assert "".join(deltas) == full[: full.index(stop)]
    assert last.finished and last.finish_reason == "stop"


# --------------------------------------------------------------------------- pieces


def test_text_stream_waits_for_whole_characters_and_holds_stop_prefixes():
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    s = TextStream(decode, frozenset(), ("END",))
    e_acute = list("é".encode())
    assert s.push(ord("a")) == "a"
    assert s.push(e_acute[0]) == ""  # half a character
    assert s.push(e_acute[1]) == "é"
    assert s.push(ord("E")) == ""  # could be the start of END
    assert s.push(ord("x")) == "Ex"
    assert [s.push(ord(c)) for c in "EN"] == ["", ""]
    assert s.push(ord("D")) == "" and s.stop_at == 4 and s.text == "aéEx"


def test_sampler_draws_from_the_softmax_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)  # [B, V]
    rows = RowParams.build([1.0] * 4000, [1.0] * 4000, list(range(4000)))
    tokens, logp = sample(logits, rows, torch.zeros(4000, dtype=torch.int64))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    torch.testing.assert_close(logp, torch.log_softmax(logits[0], -1)[tokens], atol=1e-6, rtol=0)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_mask(probs, torch.tensor([0.7])).tolist() == [[False, False, True, True]]
    assert top_p_mask(probs, torch.tensor([1.0])).tolist() == [[False] * 4]


def test_make_sampler():
    assert isinstance(make_sampler("cpu", model=build("gpt2"), tokenizer=TOK), CPUEngine)
    with pytest.raises(R1labError, match="unknown sampler"):
        make_sampler("nope")
    with pytest.raises(R1labError, match="model= and tokenizer="):
        make_sampler("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(R1labError, match="(?i)cuda|vllm"):
            make_sampler("vllm", path="unused")
