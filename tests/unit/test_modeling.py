"""r1lab.modeling: tokenizer, tiny presets, checkpoint IO (incl. plain-transformers loading), log-probs, FLOPs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1lab.config import R1labError
from r1lab.modeling import (
    PRESETS,
    ModelError,
    build_char_tokenizer,
    build_model,
    count_params,
    flops_per_token,
    load_model,
    preset_config,
    save_checkpoint,
    selective_log_softmax,
    token_logprobs,
)
from r1lab.modeling import logprobs as logprobs_mod
from r1lab.modeling.tokenizer import BYTE_OFFSET, CHAT_TEMPLATE

SRC = Path(__file__).resolve().parents[2] / "src" / "r1lab" / "modeling"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """A gpt2-1m and a qwen2-4m checkpoint written by save_checkpoint, with their in-memory models."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for preset in ("gpt2-1m", "qwen2-4m"):
        model = build_model(preset, tok, seed=0)
        out[preset] = (save_checkpoint(model, tok, root / preset), model)
    return out


# --------------------------------------------------------------------------- tokenizer

TEXTS = [
    "12+345=357",
    "  two spaces, then\nnewlines\n\n\tand a tab; {braces} \\boxed{7} ~`!@#$%^&*()_-=|'\"<>?/",
    "<|user|>1+1?<|assistant|><think>2</think> \\boxed{2}<eos>",
    "café × π ≈ 3.14 🙂 日本",  # non-ASCII: spelled as UTF-8 bytes, still exact
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_ascii_is_one_token_per_character_with_stable_ids(tok):
    text = "".join(chr(c) for c in range(32, 127)) + "\n\t"
    assert tok(text)["input_ids"] == [BYTE_OFFSET + ord(c) for c in text]
    assert len(tok) == BYTE_OFFSET + 256


def test_markup_tokens_are_single_ids_and_think_survives_skip_special(tok):
    ids = {
        t: tok(t)["input_ids"] for t in ("<pad>", "<eos>", "<|user|>", "<|assistant|>", "<think>", "</think>")
    }
    assert all(len(v) == 1 for v in ids.values())
    assert (tok.pad_token_id, tok.eos_token_id) == (ids["<pad>"][0], ids["<eos>"][0])
    seq = tok("<|user|>3*4<|assistant|><think>12</think>12<eos><pad>")["input_ids"]
    assert tok.decode(seq, skip_special_tokens=True) == "3*4<think>12</think>12"


def test_extra_chars_become_single_tokens(tok):
    wide = build_char_tokenizer(extra_chars="×√")
    assert len(wide("×")["input_ids"]) == 1 and len(tok("×")["input_ids"]) == 2
    assert wide.decode(wide("√2 × 3")["input_ids"]) == "√2 × 3"
    assert wide("ab")["input_ids"] == tok("ab")["input_ids"]  # base ids unchanged


def test_chat_template_is_compact_and_masks_the_assistant(tok):
    msgs = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "<think>2+2=4</think>4"},
    ]
    assert (
        tok.apply_chat_template(msgs, tokenize=False) == "<|user|>2+2<|assistant|><think>2+2=4</think>4<eos>"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>2+2<|assistant|>"
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "<think>2+2=4</think>4<eos>"


# --------------------------------------------------------------------------- presets


def test_preset_names_match_parameter_counts(tok):
    for name in PRESETS:
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            n = count_params(AutoModelForCausalLM.from_config(preset_config(name, tok)))
        stated = float(re.search(r"-(\d+)m$", name).group(1)) * 1e6
        print(f"{name}: {n / 1e6:.2f}M parameters")
        assert abs(n - stated) / stated < 0.12, (name, n)


def test_preset_configs_share_the_tokenizer_contract(tok):
    for name in PRESETS:
        cfg = preset_config(name, tok)
        assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings
        assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
        assert getattr(cfg, "max_position_embeddings", None) == 512


def test_build_model_is_deterministic_by_seed_and_leaves_global_rng(tok):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("gpt2-1m", tok, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b, c = build_model("gpt2-1m", tok, seed=7), build_model("gpt2-1m", tok, seed=8)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_preset_is_a_one_line_error(tok):
    with pytest.raises(ModelError, match="unknown model preset 'gpt9'.*gpt2-1m"):
        build_model("gpt9", tok)


# --------------------------------------------------------------------------- save / load

_PLAIN_LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
texts, out = json.loads(sys.argv[1]), {}
for path in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    ids = [tok(t)["input_ids"] for t in texts]
    with torch.no_grad():
        logits = model(torch.tensor([ids[0]])).logits[0].tolist()
    chat = tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False, add_generation_prompt=True)
    out[path] = {"ids": ids, "logits": logits, "chat": chat, "r1lab": "r1lab" in sys.modules}
print(json.dumps(out))
"""


def test_checkpoint_loads_in_plain_transformers_with_same_ids_and_logits(saved, tok):
    paths = [str(p) for p, _ in saved.values()]
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOADER, json.dumps(TEXTS), *paths],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for (path, model), got in zip(saved.values(), result.values(), strict=True):
        assert not got["r1lab"]
        assert got["ids"] == [tok(t)["input_ids"] for t in TEXTS], path
        assert got["chat"] == "<|user|>1+1<|assistant|>"
        with torch.no_grad():
            ours = model(torch.tensor([tok(TEXTS[0])["input_ids"]])).logits[0]
        assert torch.allclose(torch.tensor(got["logits"]), ours, atol=1e-5)


def test_load_model_round_trip(saved, tok):
    path, model = saved["qwen2-4m"]
    loaded, ltok = load_model(path)
    ids = torch.tensor([tok(TEXTS[2])["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert ltok(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]
    assert not loaded.training
    half, _ = load_model(path, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_saved_files_are_portable_to_transformers_4(saved):
    path, _ = saved["qwen2-4m"]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["chat_template"] == CHAT_TEMPLATE
    assert not isinstance(tcfg.get("extra_special_tokens"), list)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["torch_dtype"] == "float32"


def test_save_replaces_atomically_and_keeps_old_checkpoint_on_failure(tmp_path, tok):
    target = tmp_path / "step_1"
    save_checkpoint(build_model("gpt2-1m", tok, seed=0), tok, target)
    save_checkpoint(build_model("gpt2-1m", tok, seed=1), tok, target)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    before = (target / "model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model("gpt2-1m", tok, seed=2), BrokenTokenizer(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]  # no temp dirs left behind
    assert (target / "model.safetensors").read_bytes() == before


def _copy(saved, tmp_path, name="m") -> Path:
    import shutil

    dst = tmp_path / name
    shutil.copytree(saved["gpt2-1m"][0], dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_load_model_errors_are_one_line(saved, tmp_path):
    cases = {}
    cases["no such model directory"] = tmp_path / "missing"
    (tmp_path / "file").write_text("x")
    cases["not a directory"] = tmp_path / "file"
    d = _copy(saved, tmp_path, "noconfig")
    (d / "config.json").unlink()
    cases["no config.json"] = d
    d = _copy(saved, tmp_path, "badjson")
    (d / "config.json").write_text("{not json")
    cases["config.json: cannot be read"] = d
    d = _copy(saved, tmp_path, "vision")
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    cases["'vit' is not a causal language model"] = d
    d = _copy(saved, tmp_path, "noweights")
    (d / "model.safetensors").unlink()
    cases["no weights"] = d
    d = _copy(saved, tmp_path, "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    cases["weights cannot be loaded"] = d
    d = _copy(saved, tmp_path, "partial")
    tensors = load_file(d / "model.safetensors")
    tensors.pop(next(k for k in tensors if "mlp" in k))
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cases["weights incomplete: missing"] = d
    d = _copy(saved, tmp_path, "notok")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / f).unlink()
    cases["no tokenizer files"] = d
    d = _copy(saved, tmp_path, "nopad")
    _edit_json(d / "tokenizer_config.json", pad_token=None, eos_token=None)
    cases["neither a pad token nor an eos token"] = d
    for expected, path in cases.items():
        with pytest.raises(ModelError) as err:
            load_model(path)
        message = str(err.value)
        assert expected in message and str(path) in message and "\n" not in message, message
        assert isinstance(err.value, R1labError)
    with pytest.raises(ModelError, match="dtype 'fp8' not supported"):
        load_model(saved["gpt2-1m"][0], dtype="fp8")
    with pytest.raises(ModelError, match="bad device 'gpu7'"):
        load_model(saved["gpt2-1m"][0], device="gpu7")


def test_missing_pad_token_falls_back_to_eos(saved, tmp_path):
    d = _copy(saved, tmp_path, "eosonly")
    _edit_json(d / "tokenizer_config.json", pad_token=None)
    model, tokenizer = load_model(d)
    assert tokenizer.pad_token == "<eos>" and model.generation_config.pad_token_id is not None


# --------------------------------------------------------------------------- log-probs


def _naive(logits, ids, temperature=1.0):
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)  # [..., V]
    logp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_matches_naive_reference(monkeypatch, dtype):
    monkeypatch.setattr(logprobs_mod, "BLOCK_ELEMENTS", 7 * 50)  # 7 rows a block: ragged last block
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 50, (3, 5), generator=g)
    for temperature in (1.0, 0.7):
        want, want_ent = _naive(logits, ids, temperature)
        got = selective_log_softmax(logits, ids, temperature)
        got2, ent = logprobs_mod.logprobs_and_entropy(logits, ids, temperature)
        assert got.dtype == torch.float32 and got.shape == ids.shape
        assert torch.allclose(got.double(), want, atol=1e-5) and torch.equal(got, got2)
        assert torch.allclose(ent.double(), want_ent, atol=1e-4)


def test_log_softmax_gradient_is_exact(monkeypatch):
    monkeypatch.setattr(logprobs_mod, "BLOCK_ELEMENTS", 3 * 11)  # 3 rows a block
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 4), generator=g)
    for temperature in (1.0, 0.6):
        assert torch.autograd.gradcheck(lambda x, t=temperature: selective_log_softmax(x, ids, t), (logits,))
    # bf16 logits: the gradient comes back in bf16 and agrees with autograd through the fp32 reference
    x16 = (torch.randn(2, 9, 11, generator=g) * 3).to(torch.bfloat16).requires_grad_(True)
    ref = x16.detach().float().requires_grad_(True)
    weights = torch.randn(2, 9, generator=g)
    (selective_log_softmax(x16, ids.repeat(1, 3)[:, :9], 0.8) * weights).sum().backward()
    (
        torch.log_softmax(ref / 0.8, -1).gather(-1, ids.repeat(1, 3)[:, :9, None]).squeeze(-1) * weights
    ).sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    assert torch.allclose(x16.grad.float(), ref.grad, atol=2e-2)


@pytest.mark.parametrize("preset", ["gpt2-1m", "qwen2-4m"])
def test_token_logprobs_ignore_padding_and_match_reference(tok, preset):
    model = build_model(preset, tok, seed=0)
    a = tok("<|user|>12+34<|assistant|><think>4")["input_ids"]
    b = tok("<|user|>7+8<|assistant|>")["input_ids"]
    T = len(a) + 3
    ids = torch.full((2, T), tok.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = torch.tensor(a), 1  # left-padded
    ids[1, 2 : 2 + len(b)], mask[1, 2 : 2 + len(b)] = torch.tensor(b), 1  # left- and right-padded
    model.train()  # no dropout in presets: train mode must give the same numbers
    logp, ent = token_logprobs(model, ids, mask)
    assert logp.shape == ent.shape == (2, T - 1)
    with torch.no_grad():
        ref_logits = model(torch.tensor([a])).logits[0, :-1]
    want, want_ent = _naive(ref_logits, torch.tensor(a[1:]))
    assert torch.allclose(logp[0, 3:].double(), want, atol=1e-5)
    assert torch.allclose(ent[0, 3:].double(), want_ent, atol=1e-4)
    assert (logp[mask[:, 1:] == 0] == 0).all() and torch.isfinite(logp).all()
    logp.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # start=P returns only the columns after the prompt, from a shorter forward pass
    tail, _ = token_logprobs(model, ids, mask, start=8)
    assert torch.allclose(tail, logp[:, 7:].detach(), atol=1e-5)
    with pytest.raises(ValueError, match="start must be"):
        token_logprobs(model, ids, mask, start=T)


def test_token_logprobs_gradient_matches_autograd_reference(monkeypatch, tok):
    model = build_model("gpt2-1m", tok, seed=0)
    monkeypatch.setattr(logprobs_mod, "BLOCK_ELEMENTS", 3 * len(tok))  # 3 positions a block
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(BYTE_OFFSET, len(tok), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    weights = torch.randn(3, 9, generator=g)
    logp, _ = token_logprobs(model, ids, mask, start=3, temperature=0.9)  # [3, 9]
    (logp * weights).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 2:-1]  # [3, 9, V]
    ref = torch.log_softmax(logits / 0.9, -1).gather(-1, ids[:, 3:, None]).squeeze(-1)  # [3, 9]
    ref = ref.masked_fill(mask[:, 3:] == 0, 0.0)  # padded targets are 0.0 in token_logprobs too
    assert torch.allclose(logp.detach(), ref.detach(), atol=1e-5)
    (ref * weights).sum().backward()
    for a, p in zip(ours, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- cost


def test_count_params_and_flops_formula(tok):
    model = build_model("gpt2-1m", tok, seed=0)
    wte, wpe = model.transformer.wte.weight.numel(), model.transformer.wpe.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert count_params(model) == total
    assert count_params(model, exclude_embeddings=True) == total - wte - wpe
    d, n_layer, ctx = 128, 4, 256
    matmul = total - wte - wpe + wte  # the tied output projection still costs a matmul
    assert flops_per_token(model) == 2 * matmul
    assert flops_per_token(model, context=ctx) == 2 * matmul + 4 * n_layer * ctx * d
    assert flops_per_token(model, context=ctx, train=True) == 3 * flops_per_token(model, context=ctx)
    assert flops_per_token(preset_config("gpt2-1m", tok), context=ctx) == flops_per_token(model, context=ctx)


def test_modeling_core_imports_only_config_from_r1lab():
    # The stage commands living here (pretrain, commands) may use tasks; the model code may not.
    for name in ("__init__", "tokenizer", "tiny", "io", "logprobs"):
        path = SRC / f"{name}.py"
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:from|import)\s+(r1lab[\w.]*)", line)
            if m:
                assert m.group(1) == "r1lab.config" or m.group(1).startswith("r1lab.modeling"), (path, line)


# --------------------------------------------------------------------------- GPU (skipped on CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vllm_reads_our_checkpoint_like_transformers(saved, tok):
    """vLLM tokenizes like us and its sampled-token log-probs equal token_logprobs on the same weights."""
    vllm = pytest.importorskip("vllm")
    path, _ = saved["qwen2-4m"]
    llm = vllm.LLM(model=str(path), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, seed=0)
    prompts = ["<|user|>12+34<|assistant|>", "<|user|>café 7*8?<|assistant|><think>"]
    params = vllm.SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=0)
    model, _ = load_model(path, device="cuda")
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        assert list(out.prompt_token_ids) == tok(prompt)["input_ids"]
        gen = out.outputs[0]
        sampled = [lp[t].logprob for t, lp in zip(gen.token_ids, gen.logprobs, strict=True)]
        ids = torch.tensor([list(out.prompt_token_ids) + list(gen.token_ids)], device="cuda")
        with torch.no_grad():
            ours, _ = token_logprobs(model, ids, torch.ones_like(ids), start=len(out.prompt_token_ids))
        assert torch.allclose(ours[0].cpu(), torch.tensor(sampled), atol=2e-3), (ours, sampled)
