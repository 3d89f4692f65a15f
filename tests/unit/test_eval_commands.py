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


def test_eval_command_against_an_openai_compatible_server(tmp_path, monkeypatch, capsys):
    """eval -> HTTPSampler -> r1lab serve (a scripted engine that is right when the first operand is even)."""
    from r1lab.serve.app import ServeSettings, create_app
    from r1lab.serve.background import serve_in_thread
    from r1lab.serve.engine import BatchingEngine
    from r1lab.serve.prompts import ChatRenderer
    from r1lab.serve.scripted import ScriptedEngine, ScriptedTokenizer
    from r1lab.tasks import load_task

    def reply(ids: list[int]) -> str:
        question = "".join(map(chr, ids)).split("<|user|>")[-1].split("<|assistant|>")[0]
        a, b = (int(x) for x in question.split("+"))
        return f"<think>{a}+{b}</think> \\boxed{{{a + b + a % 2}}}"

    engine = BatchingEngine(ScriptedEngine(reply), max_batch=8, max_queue=64)
    app = create_app(engine, ChatRenderer(ScriptedTokenizer(), 4096), ServeSettings("scripted", api_key="k"))
    monkeypatch.setenv("R1LAB_TEST_KEY", "k")
    out = tmp_path / "eval"
    with serve_in_thread(app) as url:
        argv = ["eval", "model.base_url=" + url + "/v1", "model.name=scripted", "model.api_key_env=R1LAB_TEST_KEY",
                f"out_dir={out}", "k=2", "limit=8", "progress=false", "sampling.max_tokens=64"]  # fmt: skip
        assert main(argv) == 0
    s = json.loads((out / "eval.json").read_text())["summary"]
    problems = load_task(EvalConfig(model="x").tasks[0].model_copy(update={"limit": 8}))
    even = sum(p.meta["a"] % 2 == 0 for p in problems) / len(problems)
    assert s["pass@1"] == pytest.approx(even) and s["maj@2"] == pytest.approx(even)
    assert s["format_rate"] == 1.0 and s["error_rate"] == 0.0 and s["model"] == f"scripted @ {url}/v1"
    assert s["response_len_mean"] > 0  # the server's usage counts, split over the choices
