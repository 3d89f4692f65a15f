"""Evaluation: pass@1 averaged over k samples (avg@k), maj@k and pass@k, graded by the RL grader.

    from r1lab.eval import evaluate, write_eval
    result = evaluate(sampler, problems, k=4, params=SamplingParams(temperature=0.6, max_tokens=512))
    write_eval(result, "runs/eval")

`r1lab eval RECIPE` is the command (see `r1lab.eval.commands`).
"""

from r1lab.eval.metrics import majority_vote, pass_at_k
from r1lab.eval.run import EvalResult, SampleRecord, evaluate, write_eval

__all__ = ["EvalResult", "SampleRecord", "evaluate", "majority_vote", "pass_at_k", "write_eval"]
