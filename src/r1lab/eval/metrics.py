"""Evaluation metrics as pure functions: pass@k, majority vote, and their aggregation over problems.

Definitions (DeepSeek-R1 report, section 3; Chen et al. 2021 for pass@k):

* **pass@1 (avg@k)**: sample k completions per problem, take the fraction that is correct, average
  over problems. With k > 1 this is a lower-variance estimate of single-sample accuracy than one
  sample per problem.
* **pass@k**: probability that at least one of k samples is correct, estimated without bias from
  n >= k samples of which c are correct: `1 - C(n-c, k) / C(n, k)`. The binomials overflow for
  large n, so it is computed as the product `1 - prod_{i=n-c+1}^{n} (1 - k/i)`.
* **maj@k** (self-consistency, cons@k): the answer that most of the k samples agree on is the
  model's answer; the problem counts as solved if that answer is correct. Samples without an
  extracted answer do not vote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples, c of them correct.

    >>> pass_at_k(4, 1, 1)
    0.25
    >>> round(pass_at_k(4, 1, 2), 4)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    >>> pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)  # no correct sample; fewer wrong samples than k
    (0.0, 1.0)
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def normalise_answer(answer: str) -> str:
    """The grouping key of an answer for voting: whitespace, `$` and a trailing period do not matter.

    >>> normalise_answer(" $ 1,000 .$ ")
    '1,000'
    """
    text = answer.strip().strip("$").strip().rstrip(".").strip()
    return "".join(text.split())


@dataclass(frozen=True)
class Vote:
    """Outcome of a majority vote: the winning answer, its votes, and which samples cast them."""

    answer: str | None  # the winning answer as first written (None: no sample had an answer)
    votes: int  # size of the winning group
    members: tuple[int, ...]  # indices of the samples in the winning group, ascending


def majority_vote(
    answers: Sequence[str | None],
    equivalent: Callable[[str, str], bool] | None = None,
) -> Vote:
    """Group equal answers and return the largest group.

    Without `equivalent`, answers are equal when their `normalise_answer` keys are. With it, an
    answer joins the first group whose first answer it is equivalent to (for a verifier that is an
    equivalence relation, the result does not depend on the order of comparison). Ties go to the
    group whose first member came first, so the result is deterministic. `None` never votes.

    >>> majority_vote(["3", None, "4", "4 ", None, None, "3"])  # tie 2-2: "3" appeared first
    Vote(answer='3', votes=2, members=(0, 6))
    >>> majority_vote(["0.5", "1/2", "2"], equivalent=lambda a, b: eval(a) == eval(b)).members
    (0, 1)
    >>> majority_vote([None, None])
    Vote(answer=None, votes=0, members=())
    """
    groups: list[list[int]] = []  # sample indices per group, in order of first appearance
    by_key: dict[str, int] = {}  # normalised answer -> group index (skips re-comparing equal strings)
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        key = normalise_answer(ans)
        g = by_key.get(key)
        if g is None and equivalent is not None:
            g = next((j for j, grp in enumerate(groups) if equivalent(answers[grp[0]], ans)), None)
        if g is None:
            g = len(groups)
            groups.append([])
        by_key[key] = g
        groups[g].append(i)
    if not groups:
        return Vote(None, 0, ())
    # max() keeps the first of equal maxima, and groups are in order of first appearance
    best = max(groups, key=len)
    return Vote(answers[best[0]], len(best), tuple(best))


def ks_for(k: int, ks: Sequence[int] | None = None) -> list[int]:
    """The pass@k values to report for k samples per problem: the requested ones that fit, sorted.

    >>> ks_for(8), ks_for(8, [1, 4, 16])
    ([1, 8], [1, 4])
    """
    wanted = (1, k) if ks is None else ks
    return sorted({int(x) for x in wanted if 1 <= int(x) <= k})


def aggregate(
    counts: Sequence[tuple[int, int]], maj_correct: Sequence[bool], k: int, ks: Sequence[int]
) -> dict[str, float]:
    """Average per-problem metrics over problems.

    `counts[p] = (n, c)`: problem p has n graded samples, c of them correct (n is k unless an
    endpoint failed some); `maj_correct[p]` says whether its majority answer is correct. Problems
    with no graded sample are left out. Where n < k' for a pass@k', the problem counts as solved if
    any sample was right: a lower bound on pass@k'.

    >>> aggregate([(2, 1), (2, 0)], [True, False], k=2, ks=[1, 2])
    {'pass@1': 0.25, 'maj@2': 0.5, 'pass@2': 0.5}
    """
    kept = [(n, c, m) for (n, c), m in zip(counts, maj_correct, strict=True) if n > 0]
    if not kept:
        raise ValueError("aggregate: no problem has a graded sample")
    n_problems = len(kept)
    out = {"pass@1": sum(c / n for n, c, _ in kept) / n_problems}
    out[f"maj@{k}"] = sum(bool(m) for _, _, m in kept) / n_problems
    for kk in ks:
        if kk != 1:
            per = [pass_at_k(n, c, kk) if n >= kk else float(c > 0) for n, c, _ in kept]
            out[f"pass@{kk}"] = sum(per) / n_problems
    return out
