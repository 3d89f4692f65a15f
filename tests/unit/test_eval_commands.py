"""`r1lab eval` end to end on a tiny untrained checkpoint; the eval recipes load; errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1lab.cli import main
from r1lab.config import load_config
from r1lab.eval.config import EvalConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from r1lab.modeling import build_char_tokenizer, build_model, save_checkpoint

    tok = build_char_tokenizer()
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(build_model("gpt2-1m", tok, seed=0), tok, path)
    return path


def test_eval_command_on_a_local_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", f"model={tiny_ckpt}", f"out_dir={out}", "k=2", "limit=3", "sampling.max_tokens=6",
            "progress=false", "tasks=[{name: arithmetic, split: test}, {name: countdown, split: test}]"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "maj@2" in printed
    for tag in ("arithmetic", "countdown"):
        data = json.loads((out / f"eval_{tag}.json").read_text())
        s = data["summary"]
        assert (s["task"], s["n_problems"], s["k"]) == (tag, 3, 2)
        assert 0.0 <= s["pass@1"] <= s["pass@2"] <= 1.0
        assert 0 < s["response_len_mean"] <= 6
        rows = [json.loads(line) for line in (out / f"samples_{tag}.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and {r["sample_index"] for r in rows} == {0, 1}
    assert load_config(EvalConfig, out / "config.yaml").k == 2  # the config written is loadable


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["eval", f"model={tmp_path / 'nope'}", f"out_dir={tmp_path}", "limit=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a Hugging Face checkpoint directory" in err


@pytest.mark.parametrize("name", ["eval-tiny.yaml", "eval-gsm8k-qwen.yaml"])
def test_eval_recipes_load(name):
    cfg = load_config(EvalConfig, REPO / "recipes" / name)
    assert cfg.k >= 1 and cfg.tasks and cfg.model.path
