"""`r1lab distill RECIPE [key=value ...] [--resume]`: verified teacher traces, then SFT of the student.

One recipe, two sections: `sample:` (teacher, task, k, output) and `sft:` (student model, run_dir,
hyperparameters; its `data` defaults to the sampled traces). Overrides address either section, e.g.
`sample.k=8 sft.lr=3e-4`. Sampling always continues an interrupted run; `--resume` continues the
student's training from its latest checkpoint.
"""

from __future__ import annotations

from r1lab.config import add_recipe_arguments, load_config, recipe_and_overrides


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue the student's SFT from its latest checkpoint"
    )


def run(args) -> int:
    from r1lab.config import R1labError
    from r1lab.sft.commands import run_sft
    from r1lab.sft.config import DistillConfig
    from r1lab.sft.sample_commands import run_sample

    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(DistillConfig, recipe, overrides)
    summary = run_sample(cfg.sample)
    if summary["kept_total"] == 0:
        raise R1labError(f"{cfg.sample.output}: the teacher produced no verified trace; nothing to distill")
    run_sft(cfg.sft, resume=args.resume, where=f"{recipe or '<defaults>'} (sft)")
    return 0
