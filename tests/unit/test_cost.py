"""Cost arithmetic (FLOPs, time, dollars), GPU specs, parameter counting, and `r1lab estimate`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from r1lab.cli import main
from r1lab.metrics import cost


def test_grpo_workload_counts_every_kind_of_token():
    w = cost.grpo_workload(2e6, steps=5, prompts_per_step=4, group_size=8, prompt_tokens=30, completion_tokens=70,
                           epochs=2, reference=True, recompute_old_logp=True)  # fmt: skip
    seqs = 5 * 4 * 8
    assert w.gen_tokens == seqs * 70 and w.prefill_tokens == 5 * 4 * 30  # a prompt is read once per group
    assert w.train_tokens == seqs * 100 * 2  # two epochs
    assert w.extra_forward_tokens == seqs * 100 * 2  # reference + old policy, one forward each
    assert w.gen_flops() == 2 * 2e6 * (seqs * 70 + 5 * 4 * 30)
    assert w.train_flops() == 6 * 2e6 * seqs * 200 + 2 * 2e6 * seqs * 200
    # one epoch: the old policy is the current one, no extra forward; no KL: no reference model
    plain = cost.grpo_workload(2e6, 5, 4, 8, 30, 70, epochs=1, reference=False, recompute_old_logp=True)
    assert plain.extra_forward_tokens == 0


def test_estimate_time_and_dollars():
    work = cost.Workload(1e6, gen_tokens=1e6, prefill_tokens=0, train_tokens=1e6)  # 2e12 + 6e12 FLOPs
    gpu = cost.GPUSpec("test", 1e13, 3.6, 80)
    est = cost.estimate(work, here_peak=1e10, gpu=gpu, mfu=0.5, gen_mfu=0.25, gen_fraction=0.5,
                        train_fraction=0.6, local_price_per_hour=0.36)  # fmt: skip
    assert est["flops"] == {"generation": 2e12, "training": 6e12, "total": 8e12}
    here = est["here"]
    assert here["gen_seconds"] == pytest.approx(2e12 / 5e9)  # 400 s
    assert here["train_seconds"] == pytest.approx(6e12 / 6e9)  # 1000 s
    assert here["dollars"] == pytest.approx(1400 / 3600 * 0.36)
    assert here["dollars_per_million_generated"] == pytest.approx(400 / 3600 * 0.36)  # 1M tokens generated
    on_gpu = est["gpu"]
    assert on_gpu["gen_seconds"] == pytest.approx(2e12 / 2.5e12)
    assert on_gpu["train_seconds"] == pytest.approx(6e12 / 5e12)
    assert on_gpu["dollars"] == pytest.approx(2.0 / 3600 * 3.6)
    eight = cost.estimate(work, 1e10, gpu, mfu=0.5, gen_mfu=0.25, n_gpus=8, price_per_hour=1.0)
    assert eight["gpu"]["seconds"] == pytest.approx(2.0 / 8)
    assert eight["gpu"]["dollars"] == pytest.approx(2.0 / 3600)  # 8 GPUs for 1/8 the time
    with pytest.raises(ValueError, match="mfu"):
        cost.estimate(work, 1e10, gpu, mfu=1.5)


def test_gpu_specs_are_dense_bf16_peaks():
    assert cost.gpu_spec("h100").bf16_flops == pytest.approx(989e12)
    assert cost.gpu_spec("A100").bf16_flops == pytest.approx(312e12)
    assert cost.gpu_spec("H200").memory_gb > cost.gpu_spec("H100").memory_gb
    assert set(cost.GPU_SPECS) == {"H100", "H200", "A100", "L4", "RTX4090"}
    with pytest.raises(KeyError, match="unknown GPU"):
        cost.gpu_spec("TPU")


def test_count_checkpoint_params_reads_headers_only(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, tmp_path / "model-00001.safetensors")
    save_file({"c": torch.zeros(2, 2, 2)}, tmp_path / "model-00002.safetensors")
    assert cost.count_checkpoint_params(tmp_path) == 12 + 5 + 8
    assert cost.count_checkpoint_params(tmp_path / "empty") is None


def test_measure_matmul_peak_is_a_plausible_rate():
    peak = cost.measure_matmul_peak("float32", seconds=0.2)
    assert 1e8 < peak < 1e14  # any CPU of the last decade; not a timing assertion


def test_every_gemm_kernel_computes_the_product():
    a, b = torch.randn(64, 48), torch.randn(48, 80)
    kernels = cost.gemm_kernels(a, b)
    assert "torch.mm" in kernels
    for name, fn in kernels.items():
        torch.testing.assert_close(fn(), a @ b, atol=1e-4, rtol=1e-4, msg=name)


GRPO = """model: some-model
task: {name: arithmetic}
sampling: {max_tokens: 50}
rl: {steps: 10, prompts_per_step: 4, group_size: 8, kl_coef: 0.0}
eval_problems: 20
eval_k: 2
"""


def test_estimate_command_writes_estimate_json(tmp_path, capsys):
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(GRPO)
    run_dir = tmp_path / "run"
    argv = ["estimate", str(recipe), "rl.steps=20", "--params", "1e6", "--prompt-tokens", "10", "--peak", "1e10",
            "--gpu", "A100", "--price-per-hour", "2", "--run-dir", str(run_dir), "--calibrate", "off"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 x A100" in out and "FLOPs total" in out
    est = json.loads((run_dir / "estimate.json").read_text())
    seqs = 20 * 4 * 8  # the override took effect
    evals = 20 * 2  # one final evaluation: eval_problems x eval_k
    assert est["workload"]["gen_tokens"] == pytest.approx((seqs + evals) * 50)
    assert est["workload"]["train_tokens"] == pytest.approx(seqs * 60)
    prompts = 20 * 4 + 20  # training prompts, held-out problems
    assert est["flops"]["total"] == pytest.approx(
        2e6 * ((seqs + evals) * 50 + prompts * 10) + 6e6 * seqs * 60
    )
    assert est["gpu"]["price_per_hour"] == 2 and est["kind"] == "grpo"


def test_estimate_command_errors_are_one_line(tmp_path, capsys):
    recipe = tmp_path / "odd.yaml"
    recipe.write_text("model: x\n")
    assert main(["estimate", str(recipe), "--params", "1e6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot tell the recipe's kind" in err and len(err.splitlines()) == 1
    recipe.write_text(GRPO.replace("some-model", str(tmp_path / "missing")))
    assert main(["estimate", str(recipe), "--prompt-tokens", "5", "--peak", "1e9"]) == 2  # no such checkpoint
    assert "pass --params" in capsys.readouterr().err


def test_model_params_are_the_matmul_params_the_training_loops_use(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from r1lab.metrics.estimate_commands import model_params
    from r1lab.modeling import matmul_params

    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=100)
    config.save_pretrained(tmp_path)  # config.json only: the count needs no weights
    expected = matmul_params(AutoModelForCausalLM.from_config(config))
    assert model_params(str(tmp_path), None, "r.yaml") == expected
    assert model_params(str(tmp_path), 123.0, "r.yaml") == 123.0  # --params wins


def test_calibration_times_the_model_itself():
    from r1lab.metrics.estimate_commands import calibrate

    cal = calibrate("gpt2-1m", {"rows": 4, "seq_tokens": 16}, {"gen": "float32", "train": "float32"})
    assert cal["rows"] == 4
    assert cal["gen_tokens_per_s"] > 0 and cal["train_tokens_per_s"] > 0
    n = cal["gen_flops_per_s"] / cal["gen_tokens_per_s"] / 2  # the N it counted with
    assert cal["train_flops_per_s"] == pytest.approx(6 * n * cal["train_tokens_per_s"])
