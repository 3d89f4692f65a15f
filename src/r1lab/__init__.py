"""r1lab: the DeepSeek-R1 recipe (GRPO with verifiable rewards, distillation, evaluation, serving)
that runs end to end on a laptop CPU with tiny models and scales to GPUs."""

__version__ = "0.1.0"
