"""`evaluate` with a scripted sampler and grader gives known numbers; `write_eval` writes them."""

from __future__ import annotations

import json

import pytest

from r1lab.chat import parse
from r1lab.config import ConfigError, RewardSpec, load_config
from r1lab.eval.config import EvalConfig
from r1lab.eval.run import EvalError, evaluate, write_eval
from r1lab.rewards.base import Reward
from r1lab.rollout.base import Completion, SamplingParams
from r1lab.tasks.base import Problem


class ScriptedSampler:
    """Returns pre-written completions: `script[question][j]` is sample j for that question."""

    def __init__(self, script: dict[str, list[str]], finish: dict[str, list[str]] | None = None):
        self.script, self.finish, self.calls = script, finish or {}, []

    def generate(self, prompts, n, params):
        self.calls.append((len(prompts), n, params.seed))
        out = []
        for i, msgs in enumerate(prompts):
            q = msgs[-1]["content"]
            for j in range(n):
                text = self.script[q][j]
                reason = self.finish.get(q, ["stop"] * n)[j]
                out.append(
                    Completion(i, text, list(range(len(text.split()))), [0.0] * len(text.split()), reason)
                )
        return out


def exact_grader(text, problem, spec=None, n_tokens=0, max_tokens=0):
    """Correct when the extracted answer equals the reference as a number (so '12.0' == '12')."""
    p = parse(text)
    try:
        right = p.answer is not None and float(p.answer) == float(problem.reference)
    except ValueError:
        right = False
    fmt = 1.0 if p.well_formed else 0.0
    return Reward(
        spec.accuracy_weight * right + spec.format_weight * fmt,
        {"accuracy": float(right), "format": fmt},
        p.answer,
    )


def problem(i: int, ref: str) -> Problem:
    return Problem(f"p{i}", [{"role": "user", "content": f"q{i}"}], ref)


def T(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think> \\boxed{{{answer}}}"


PROBLEMS = [problem(0, "12"), problem(1, "5"), problem(2, "9")]
SCRIPT = {
    # all right, one of them as "12.0": pass@1 1, maj right
    "q0": [T("a b", "12"), T("a b c d", "12.0"), T("a", "12"), T("a b", "12")],
    # one right of four; the wrong answers agree on 4: maj wrong, pass@4 1
    "q1": [T("a", "4"), T("a", "4"), T("a", "5"), "no think 4"],
    # right answer written two ways outvotes two different wrong ones only when they are merged
    "q2": [T("x", "7"), T("x", "9"), T("x", "9.0"), "<think>never closed"],
}


def run(batch_prompts=2, **kw):
    sampler = ScriptedSampler(SCRIPT, kw.pop("finish", None))
    params = SamplingParams(temperature=1.0, max_tokens=32, seed=kw.pop("seed", None))
    res = evaluate(
        sampler, PROBLEMS, 4, params, RewardSpec(), ks=[1, 2, 4], progress=False,
        batch_prompts=batch_prompts, grader=exact_grader, **kw,
    )  # fmt: skip
    return res, sampler


def test_evaluate_known_numbers():
    res, _ = run()
    s = res.summary
    assert s["n_problems"] == 3 and s["k"] == 4
    assert s["pass@1"] == pytest.approx((4 / 4 + 1 / 4 + 2 / 4) / 3)
    assert s["maj@4"] == pytest.approx(2 / 3)  # q0 and q2 (9 and 9.0 merged: 2 votes beat 7's 1)
    # pass@2: q0 1, q1 1 - C(3,2)/C(4,2) = 0.5, q2 1 - C(2,2)/C(4,2) = 5/6
    assert s["pass@2"] == pytest.approx((1 + 0.5 + 5 / 6) / 3)
    assert s["pass@4"] == pytest.approx(1.0)
    assert s["format_rate"] == pytest.approx(10 / 12)
    assert s["answer_rate"] == pytest.approx(11 / 12)  # only the never-closed think has no answer
    lengths = [len(t.split()) for q in ("q0", "q1", "q2") for t in SCRIPT[q]]
    assert s["response_len_mean"] == pytest.approx(sum(lengths) / 12)
    assert s["response_len_max"] == max(lengths)
    assert s["generated_tokens"] == sum(lengths)
    assert s["wall_time_s"] >= 0 and s["error_rate"] == 0


def test_per_problem_votes_and_sample_records():
    res, _ = run()
    votes = {p.problem_id: (p.n_correct, p.maj_answer, p.maj_votes, p.maj_correct) for p in res.problems}
    assert votes == {"p0": (4, "12", 4, True), "p1": (1, "4", 2, False), "p2": (2, "9", 2, True)}
    assert len(res.samples) == 12
    rec = res.samples[5]  # problem 1, sample 1
    assert (rec.problem_id, rec.sample_index, rec.answer, rec.correct, rec.reference) == (
        "p1",
        1,
        "4",
        False,
        "5",
    )
    assert rec.parts == {"accuracy": 0.0, "format": 1.0} and rec.finish_reason == "stop"


def test_chunking_and_per_chunk_seeds_do_not_change_results():
    a, sa = run(batch_prompts=2, seed=7)
    b, sb = run(batch_prompts=10)
    assert sa.calls == [(2, 4, 7), (1, 4, 8)]  # chunk i samples with seed + i
    assert sb.calls == [(3, 4, None)]
    strip = lambda s: {k: v for k, v in s.items() if k not in ("wall_time_s", "tokens_per_s")}  # noqa: E731
    assert strip(a.summary) == strip(b.summary)


def test_samples_lost_by_an_endpoint_are_not_graded():
    finish = {"q1": ["error", "error", "stop", "stop"]}
    res, _ = run(finish=finish)
    p1 = res.problems[1]
    assert (p1.n_samples, p1.n_correct) == (2, 1)
    assert res.summary["pass@1"] == pytest.approx((1 + 1 / 2 + 2 / 4) / 3)
    assert res.summary["error_rate"] == pytest.approx(2 / 12)


def test_an_endpoint_that_delivers_nothing_is_one_clear_error():
    script = {"q0": ["x"] * 2}
    sampler = ScriptedSampler(script, {"q0": ["error", "error"]})
    with pytest.raises(EvalError, match="none of the 2 samples"):
        evaluate(sampler, PROBLEMS[:1], 2, SamplingParams(), progress=False, grader=exact_grader)


def test_write_eval_files(tmp_path):
    res, _ = run()
    path = write_eval(res, tmp_path)
    assert path.name == "eval.json"
    data = json.loads(path.read_text())
    assert data["summary"]["pass@1"] == pytest.approx(res.summary["pass@1"])
    assert [p["problem_id"] for p in data["problems"]] == ["p0", "p1", "p2"]
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["text"] == SCRIPT["q0"][0]
    tagged = write_eval(res, tmp_path, tag="base")
    assert tagged.name == "eval_base.json" and (tmp_path / "samples_base.jsonl").exists()


def test_eval_config_model_forms(tmp_path):
    cfg = load_config(EvalConfig, None, ["model=some/dir"])
    assert cfg.model.path == "some/dir" and cfg.tasks[0].split == "test"
    cfg = load_config(EvalConfig, None, ["model.base_url=http://x/v1", "model.name=m", "k=2"])
    assert cfg.model.describe() == "m @ http://x/v1"
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(EvalConfig, None, ["model.path=a", "model.base_url=http://x/v1", "model.name=m"])
    with pytest.raises(ConfigError, match="model.name is required"):
        load_config(EvalConfig, None, ["model.base_url=http://x/v1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: a\ntasks:\n  - {name: gsm8k, split: test, limit: 3}\nk: 0\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: field 'k'"):
        load_config(EvalConfig, recipe)
