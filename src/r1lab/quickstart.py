"""The quickstart: R1-Zero on a laptop, end to end, in minutes.

1. build (or reuse) a tiny base model pretrained from scratch on the arithmetic corpus;
2. evaluate it on held-out problems (never seen in pretraining or RL): pass@1 averaged over k samples,
   mean response length, reflection-word rate;
3. run GRPO with the rule-based reward only (is the final answer right?): no teacher, no labels of
   how to reason;
4. evaluate again, print base vs RL, and keep everything in the run directory (`summary.json`, the
   GRPO run with its metrics and checkpoints, eval samples, `report.html`).

Run it:  r1lab quickstart [recipes/quickstart.yaml] [grpo.rl.steps=200 ...]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pydantic import Field

from r1lab.config import (
    SamplingSpec,
    Section,
    TaskSpec,
    add_recipe_arguments,
    dump_config,
    load_config,
    recipe_and_overrides,
)
from r1lab.distill_finding import DistillFindingConfig
from r1lab.metrics import emergence_stats
from r1lab.metrics.run import RunDir
from r1lab.pretrain import PretrainConfig
from r1lab.rl.config import GRPOConfig, RLSection

DEFAULT_OUT = "runs/quickstart"


class QuickstartGRPO(GRPOConfig):
    """The GRPO stage of the quickstart; `model` and `run_dir` are filled in by the quickstart."""

    model: str = Field("", description="set by the quickstart: the base model it built")
    run_dir: str = Field("", description="set by the quickstart: OUT/grpo")
    task: TaskSpec = Field(
        default_factory=lambda: TaskSpec(name="arithmetic", split="train", limit=50_000, seed=1),
        description="RL problems; the quickstart sets options.digits from its own `digits`",
    )
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(temperature=1.0, max_tokens=128))
    rl: RLSection = Field(
        default_factory=lambda: RLSection(steps=60, prompts_per_step=16, group_size=8, lr=1e-4, kl_coef=0.05)
    )
    eval_every: int = 20
    eval_problems: int = 100
    save_every: int = 20


class HeldOut(Section):
    problems: int = Field(200, ge=1, description="held-out problems (test split: never in pretraining or RL)")
    k: int = Field(4, ge=1, description="samples per problem; pass@1 is averaged over them")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the evaluation")
    max_tokens: int = Field(128, ge=1)


class QuickstartConfig(Section):
    out: str = Field(DEFAULT_OUT, description="run directory of the whole quickstart")
    seed: int = Field(0)
    digits: int = Field(
        3, ge=1, le=9, description="the built-in task: additions of numbers with this many digits"
    )
    threads: int | None = Field(None, ge=1, description="torch threads for every stage (None: all cores)")
    reuse_base: bool = Field(
        True,
        description="use a base built with the same settings (OUT/base, or one shipped in r1lab/data/bases)",
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    grpo: QuickstartGRPO = Field(default_factory=QuickstartGRPO)
    eval: HeldOut = Field(default_factory=HeldOut)
    report: bool = Field(True, description="write OUT/report.html at the end")
    full: DistillFindingConfig = Field(
        default_factory=DistillFindingConfig, description="the distillation comparison (`--full` runs it)"
    )


def task_spec(cfg: QuickstartConfig) -> TaskSpec:
    """The RL task with the quickstart's digit count (pretraining and evaluation derive from it)."""
    options = {**cfg.grpo.task.options, "digits": cfg.digits}
    return cfg.grpo.task.model_copy(update={"options": options})


def evaluate_model(model_dir: Path, cfg: QuickstartConfig, tag: str, out: Path) -> dict:
    """Held-out pass@1 (avg over k), length and reflection rate of a checkpoint; writes eval_<tag>.json."""
    from r1lab.eval.run import evaluate, write_eval
    from r1lab.modeling import load_model, matmul_params
    from r1lab.rollout.base import SamplingParams
    from r1lab.rollout.cpu import CPUEngine
    from r1lab.tasks import load_task

    model, tokenizer = load_model(model_dir)
    spec = task_spec(cfg).model_copy(update={"split": "test", "limit": cfg.eval.problems})
    problems = load_task(spec)[: cfg.eval.problems]
    engine = CPUEngine(model, tokenizer, seed=cfg.seed)
    params = SamplingParams(
        temperature=cfg.eval.temperature, max_tokens=cfg.eval.max_tokens, seed=cfg.seed + 999
    )
    result = evaluate(engine, problems, cfg.eval.k, params, cfg.grpo.reward, batch_prompts=64)
    write_eval(result, out, tag=tag)
    texts = [s.text for s in result.samples]
    lengths = [s.n_tokens or 0 for s in result.samples]
    emerg = emergence_stats(texts, lengths, cfg.grpo.reflection_words)
    s = result.summary
    return {
        "pass@1": s["pass@1"],
        f"maj@{cfg.eval.k}": s.get(f"maj@{cfg.eval.k}"),
        f"pass@{cfg.eval.k}": s.get(f"pass@{cfg.eval.k}"),
        "format_rate": s["format_rate"],
        "response_len_mean": emerg["response_len_mean"],
        "reflection_rate": emerg["reflection_rate"],
        "seconds": s["wall_time_s"],
        "flops": 2 * matmul_params(model) * s["generated_tokens"],
    }


SHIPPED_BASES = Path(__file__).parent / "data" / "bases"


def base_fingerprint(pre: PretrainConfig) -> str:
    """What determines a base model: every pretraining setting except where it is written and how fast."""
    return json.dumps(pre.model_dump(mode="json", exclude={"out", "progress", "threads"}), sort_keys=True)


def find_base(fingerprint: str, dirs: list[Path]) -> Path | None:
    """A base directory (holding model/ and settings.json) built with exactly these settings."""
    for d in dirs:
        stamp = d / "settings.json"
        if (d / "model").is_dir() and stamp.exists() and stamp.read_text(encoding="utf-8") == fingerprint:
            return d
    return None


def build_base(cfg: QuickstartConfig, out: Path) -> tuple[Path, float, float]:
    """Load a base built with the same settings (this run's, or one shipped with r1lab), or pretrain
    it; returns (model dir, seconds spent pretraining now, pretraining FLOPs)."""
    from r1lab.pretrain import pretrain

    pre_task = task_spec(cfg).model_copy(update={"limit": None, "seed": cfg.seed})
    pre = cfg.pretrain.model_copy(update={"out": str(out / "base"), "seed": cfg.seed, "task": pre_task})
    fingerprint = base_fingerprint(pre)
    candidates = [out / "base", *sorted(SHIPPED_BASES.glob("*"))] if cfg.reuse_base else []
    found = find_base(fingerprint, candidates)
    if found is not None:
        info = json.loads((found / "pretrain_summary.json").read_text())
        print(
            f"using the base model in {found / 'model'} (built with these exact settings; "
            f"{info.get('seconds', 0):.0f} s of pretraining when it was made)"
        )
        return found / "model", 0.0, info.get("flops", 0.0)
    t0 = time.monotonic()
    pretrain(pre)
    (out / "base" / "settings.json").write_text(fingerprint, encoding="utf-8")
    info = json.loads((out / "base" / "pretrain_summary.json").read_text())
    return out / "base" / "model", time.monotonic() - t0, info.get("flops", 0.0)


def run_quickstart(cfg: QuickstartConfig, full: bool = False) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    t_all = time.monotonic()
    base_dir, pre_s, pre_flops = build_base(cfg, out)
    base = evaluate_model(base_dir, cfg, "base", out)

    from r1lab.rl.grpo import train

    grpo_dir = out / "grpo"
    shutil.rmtree(grpo_dir, ignore_errors=True)  # derived from the base: a rerun starts RL afresh
    grpo_cfg = cfg.grpo.model_copy(
        update={"model": str(base_dir), "run_dir": str(grpo_dir), "seed": cfg.seed, "task": task_spec(cfg)}
    )
    t0 = time.monotonic()
    last = train(grpo_cfg)
    rl_s = time.monotonic() - t0
    rl_flops = sum(r.get("flops", 0) for r in RunDir(grpo_dir).read_metrics())
    rl = evaluate_model(Path(last["final_checkpoint"]), cfg, "rl", out)

    summary = {
        "task": f"{cfg.grpo.task.name} ({cfg.digits}-digit addition)",
        "k": cfg.eval.k,
        "n_heldout": cfg.eval.problems,
        "base": base,
        "rl": rl,
        "pass@1_gain": rl["pass@1"] - base["pass@1"],
        "seconds": {"pretrain": pre_s, "eval_base": base["seconds"], "grpo": rl_s, "eval_rl": rl["seconds"]},
        "flops": {"pretrain": pre_flops, "eval": base["flops"] + rl["flops"], "grpo": rl_flops},
        "rl_steps": last.get("step"),
        "checkpoint": last["final_checkpoint"],
    }
    if full:
        from r1lab.distill_finding import print_finding, run_distillation_finding

        finding = run_distillation_finding(cfg, out / "distill", Path(last["final_checkpoint"]), summary)
        summary["distillation"] = finding
        summary["seconds"]["distillation"] = finding.get("seconds", {}).get("total", 0.0)
    summary["seconds"]["total"] = time.monotonic() - t_all
    summary["flops"]["total"] = sum(v for k, v in summary["flops"].items())
    RunDir(out).write_json("summary.json", summary)
    if cfg.report:
        from r1lab.report import write_report

        summary["report"] = str(write_report([out, grpo_dir], out / "report.html"))
    print_table(summary)
    if full:
        print_finding(summary["distillation"])
    return summary


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    k = summary["k"]
    t = Table(
        title=f"R1-Zero on a laptop: {summary['task']}, {summary['n_heldout']} held-out problems, k={k}"
    )
    t.add_column("")
    t.add_column("base", justify="right")
    t.add_column("after GRPO", justify="right")
    b, r = summary["base"], summary["rl"]
    t.add_row("pass@1 (avg over k)", f"{b['pass@1']:.1%}", f"{r['pass@1']:.1%}")
    t.add_row(f"maj@{k}", f"{b[f'maj@{k}']:.1%}", f"{r[f'maj@{k}']:.1%}")
    t.add_row(
        "mean response length (tokens)", f"{b['response_len_mean']:.1f}", f"{r['response_len_mean']:.1f}"
    )
    t.add_row("reflection-word rate", f"{b['reflection_rate']:.1%}", f"{r['reflection_rate']:.1%}")
    t.add_row("format rate", f"{b['format_rate']:.1%}", f"{r['format_rate']:.1%}")
    sec, fl = summary["seconds"], summary["flops"]
    t.add_row(
        "wall time",
        f"pretrain {sec['pretrain']:.0f}s",
        f"GRPO {sec['grpo']:.0f}s ({summary['rl_steps']} steps)",
    )
    t.add_row("total", f"{sec['total']:.0f}s", f"{fl['total']:.3g} FLOPs")
    Console().print(t)
    if "report" in summary:
        print(f"report: {summary['report']}")


def default_checkpoint(out: str = DEFAULT_OUT) -> Path:
    """The quickstart's trained model (what `r1lab serve` serves by default), built if absent."""
    summary = Path(out) / "summary.json"
    if summary.exists():
        path = Path(json.loads(summary.read_text())["checkpoint"])
        if path.is_dir():
            return path
    return Path(run_quickstart(QuickstartConfig(out=out))["checkpoint"])


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--full", action="store_true", help="also run the distillation finding (distilled vs RL-only student)"
    )


def run(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(QuickstartConfig, recipe, overrides)
    run_quickstart(cfg, full=args.full)
    return 0
