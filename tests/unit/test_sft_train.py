"""The SFT training contract on a tiny model: the loss falls and weights move, accumulation and packing
do not change the gradient, and an interrupted + resumed run ends with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from r1lab.config import ConfigError, R1labError, load_config
from r1lab.modeling import build_char_tokenizer, build_model, load_model, save_checkpoint
from r1lab.sft.config import SFTConfig
from r1lab.sft.data import encode, step_micro_batches
from r1lab.sft.train import accumulate, sft_loss, train

TOK = build_char_tokenizer()


def conv(i: int) -> list[dict[str, str]]:
    a, b = 10 + 7 * i, 3 + 5 * i
    answer = f"<think>{a}+{b}={a + b}</think>{a + b}"
    return [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": answer}]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model"
    save_checkpoint(build_model("gpt2-1m", TOK, seed=0), TOK, path)
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "traces.jsonl"
    path.write_text("".join(json.dumps({"messages": conv(i)}) + "\n" for i in range(12)), encoding="utf-8")
    return path


def cfg_for(base, traces, run_dir, **kw) -> SFTConfig:
    fields = dict(model=str(base), data=[str(traces)], run_dir=str(run_dir), progress=False, threads=1)
    fields.update(batch_size=4, micro_batch_tokens=128, lr=3e-3, warmup_steps=1, device="cpu")
    fields.update(kw)
    return SFTConfig(**fields)


def test_sft_loss_is_the_mean_nll_of_target_tokens_only():
    logits = torch.randn(2, 4, 5)  # [B, T, V]
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    targets = torch.tensor([[False, False, True, True], [False, True, False, False]])
    logp = logits.log_softmax(-1)
    want = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[1, 0, 1]) / 3
    torch.testing.assert_close(sft_loss(logits, ids, targets, 3.0), want)
    logits2 = logits.clone()
    logits2[0, 0] += 100.0  # position 0 predicts a non-target token: no effect
    torch.testing.assert_close(sft_loss(logits2, ids, targets, 3.0), want)


def _grads(model, mbs) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate(model, mbs, False, torch.device("cpu"))
    return loss, [p.grad.clone() for p in model.parameters()]


def test_accumulation_and_packing_give_the_gradient_of_one_big_batch():
    model = build_model("gpt2-1m", TOK, seed=0).train()
    exs = [encode(TOK, conv(i)) for i in range(8)]
    idx, pad = list(range(8)), TOK.pad_token_id
    big = step_micro_batches(exs, idx, "bucket", token_budget=10_000, row_len=128, pad_id=pad)
    small = step_micro_batches(exs, idx, "bucket", token_budget=20, row_len=128, pad_id=pad)
    packed = step_micro_batches(exs, idx, "pack", token_budget=128, row_len=64, pad_id=pad)
    assert len(big) == 1 and len(small) == 8 and len(packed) > 1
    loss_big, g_big = _grads(model, big)
    for mbs in (small, packed):
        loss, g = _grads(model, mbs)
        assert loss == pytest.approx(loss_big, rel=1e-5)
        for a, b in zip(g, g_big, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_loss_falls_weights_change_and_the_model_loads(base, traces, tmp_path):
    cfg = cfg_for(base, traces, tmp_path / "run", epochs=8, batching="pack", micro_batch_tokens=256)
    last = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))  # 12 conversations / 4 per step x 8 epochs
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert all(r["tokens"] > 0 and r["tok_per_s"] > 0 and r["lr"] > 0 for r in rows)
    model, _ = load_model(last["model"])
    before, _ = load_model(base)
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters(), strict=True)]
    assert all(changed)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["conversations"] == 12


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(base, traces, tmp_path):
    whole = train(cfg_for(base, traces, tmp_path / "whole", epochs=2))
    cfg = cfg_for(base, traces, tmp_path / "cut", epochs=2)
    part = train(cfg, stop_after=4)
    assert part["model"] is None and part["step"] == 4
    with pytest.raises(R1labError, match="--resume"):
        train(cfg)
    resumed = train(cfg, resume=True)
    a = load_file(f"{whole['model']}/model.safetensors")
    b = load_file(f"{resumed['model']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 7))


def test_recipe_errors_name_the_field(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("model: m\ndata: t.jsonl\nbatching: zip\n")
    with pytest.raises(ConfigError, match="batching"):
        load_config(SFTConfig, recipe)
    recipe.write_text("model: m\ndata: t.jsonl\n")
    assert load_config(SFTConfig, recipe).data == ["t.jsonl"]


def test_resume_on_changed_data_is_refused(base, traces, tmp_path):
    data = tmp_path / "traces.jsonl"
    data.write_text(traces.read_text())
    cfg = cfg_for(base, data, tmp_path / "run", epochs=2)
    train(cfg, stop_after=2)
    with open(data, "a") as f:
        f.write(json.dumps({"messages": conv(99)}) + "\n")
    with pytest.raises(R1labError, match="data changed"):
        train(cfg, resume=True)


def test_packing_is_refused_for_a_model_that_would_mix_sequences(base, traces, tmp_path, monkeypatch):
    import r1lab.sft.train as sft_train

    monkeypatch.setattr(sft_train, "packing_supported", lambda model: False)  # e.g. a custom forward
    with pytest.raises(R1labError, match="batching=pack needs a model") as err:
        train(cfg_for(base, traces, tmp_path / "run", batching="pack"))
    assert "batching=bucket" in str(err.value)
    train(cfg_for(base, traces, tmp_path / "run2", max_steps=1))  # bucketing does not need the probe
    monkeypatch.undo()
    train(cfg_for(base, traces, tmp_path / "run3", batching="pack", max_steps=1))  # a real model passes
