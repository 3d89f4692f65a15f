"""The four-stage R1 recipe as one command (`r1lab pipeline RECIPE`): cold-start SFT on a few
verified long traces -> RL -> rejection-sampling SFT -> RL, one report over all stages.

`stages` holds the config and each stage; `commands` is the driver (base, resume, report). Like the
distillation finding (`r1lab.distill_finding`), it composes whole stages (sft, rl, eval) and sits
above them: no stage imports it.
"""
