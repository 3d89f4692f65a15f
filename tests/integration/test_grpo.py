"""The GRPO training contract on tiny models: parameters change, reward rises where it should,
SIGKILL + resume equals an uninterrupted run, checkpoints load with plain transformers, and bad
input fails at once with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1lab.config import load_config
from r1lab.modeling import load_model
from r1lab.rl.config import GRPOConfig
from r1lab.rl.grpo import train

pytestmark = pytest.mark.slow

R1LAB = str(Path(sys.executable).parent / "r1lab")


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The quickstart's shipped 1.9M-parameter base: right on about a quarter of 3-digit additions,
    mostly by column working, so RL has something to raise."""
    from r1lab.quickstart import SHIPPED_BASES

    path = SHIPPED_BASES / "arith3-gpt2-2m" / "model"
    assert path.is_dir(), "the shipped base is missing (r1lab pretrain recipes/pretrain-arithmetic.yaml)"
    return path


def grpo_config(base: Path, run_dir: Path, **over) -> GRPOConfig:
    data = {
        "model": str(base),
        "run_dir": str(run_dir),
        "seed": 3,
        "threads": 1,
        "progress": False,
        "task": {"name": "arithmetic", "split": "train", "limit": 2000, "options": {"digits": 3}},
        "sampling": {"temperature": 1.0, "max_tokens": 96},
        "rl": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "lr": 1e-3},
        "eval_problems": 8,
        "samples_every": 0,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            data[k] = {**data.get(k, {}), **v}
        else:
            data[k] = v
    return GRPOConfig.model_validate(data)


def weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_grpo_changes_parameters_and_raises_reward(tiny_base, tmp_path):
    cfg = grpo_config(
        tiny_base, tmp_path / "run", rl={"steps": 30, "prompts_per_step": 8, "group_size": 8, "lr": 3e-4}
    )
    last = train(cfg)
    before, after = weights(tiny_base), weights(Path(last["final_checkpoint"]))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, "most parameter tensors must move"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["reward"] for r in rows[:8]) / 8
    final = sum(r["reward"] for r in rows[-8:]) / 8
    assert final > first + 0.1, f"reward should rise on a learnable task: {first:.3f} -> {final:.3f}"
    for key in (
        "reward/accuracy",
        "format_rate",
        "response_len_mean",
        "reflection_rate",
        "entropy",
        "clip_frac",
        "flops",
    ):
        assert key in rows[-1]
    assert "eval/pass@1" in rows[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grpo_trains_on_cuda_with_the_cpu_engine(tiny_base, tmp_path):
    """The trainer on a GPU without vLLM: the model trains on CUDA, the rollout engine reads a CPU copy."""
    cfg = grpo_config(tiny_base, tmp_path / "run", device="cuda", rl={"steps": 3})
    last = train(cfg)
    before, after = weights(tiny_base), weights(Path(last["final_checkpoint"]))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["tokens"] > 0


def test_checkpoint_loads_with_plain_transformers(tiny_base, tmp_path):
    last = train(grpo_config(tiny_base, tmp_path / "run", rl={"steps": 1}))
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "ids = t.apply_chat_template([{'role': 'user', 'content': '12+34'}], add_generation_prompt=True, return_tensors='pt');"
        "ids = ids['input_ids'] if not torch.is_tensor(ids) else ids;"
        "print(m(ids).logits.shape[-1] == len(t))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, last["final_checkpoint"]], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")


def _recipe(tmp_path: Path, cfg: GRPOConfig) -> Path:
    import yaml

    path = tmp_path / f"{Path(cfg.run_dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_sigkill_and_resume_equals_uninterrupted(tiny_base, tmp_path):
    steps = 6
    reference = train(grpo_config(tiny_base, tmp_path / "straight", rl={"steps": steps}, save_every=1))
    cfg = grpo_config(tiny_base, tmp_path / "killed", rl={"steps": steps}, save_every=1)
    recipe = _recipe(tmp_path, cfg)
    proc = subprocess.Popen([R1LAB, "grpo", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() in {"step_2", "step_3"}:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at != f"step_{steps}"
    resumed = train(load_config(GRPOConfig, recipe), resume=True)
    a, b = weights(Path(reference["final_checkpoint"])), weights(Path(resumed["final_checkpoint"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from {killed_at}"
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "each step logged exactly once"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=/no/such/model", "/no/such/model"),
        ("task.name=nosuchtask", "nosuchtask"),
        ("rl.group_size=1", "rl.group_size"),
    ],
)
def test_bad_input_fails_at_once_with_one_line(tiny_base, tmp_path, override, expected):
    cfg = grpo_config(tiny_base, tmp_path / "run")
    recipe = _recipe(tmp_path, cfg)
    t0 = time.monotonic()
    out = subprocess.run([R1LAB, "grpo", str(recipe), override], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert time.monotonic() - t0 < 120


def test_tokenizer_without_pad_or_eos_is_refused(tiny_base, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    cfg_path = broken / "tokenizer_config.json"
    data = json.loads(cfg_path.read_text())
    for key in ("pad_token", "eos_token"):
        data.pop(key, None)
    cfg_path.write_text(json.dumps(data))
    special = broken / "special_tokens_map.json"
    if special.exists():
        special.unlink()
    cfg = grpo_config(broken, tmp_path / "run")
    out = subprocess.run([R1LAB, "grpo", str(_recipe(tmp_path, cfg))], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "pad" in out.stderr or "eos" in out.stderr
