"""pass@k against brute-force enumeration, majority vote rules, aggregation over problems."""

from __future__ import annotations

import itertools
import math

import pytest

from r1lab.eval.metrics import aggregate, ks_for, majority_vote, pass_at_k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) is ~1e600: the ratio form cannot be computed in floats, the product form can
    n, c, k = 2000, 3, 1000
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python ints: exact, then one division
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(64, 17, 1) == pytest.approx(17 / 64)


@pytest.mark.parametrize("args", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_majority_vote_none_never_wins_even_when_most_common():
    v = majority_vote([None, None, None, "5"])
    assert (v.answer, v.votes, v.members) == ("5", 1, (3,))


def test_majority_vote_ties_go_to_first_seen_and_are_order_stable():
    assert majority_vote(["4", "3", "3", "4"]).answer == "4"
    assert majority_vote(["3", "4", "4", "3"]).answer == "3"


def test_majority_vote_normalises_whitespace_dollars_and_period():
    v = majority_vote(["$12$", "12.", " 1 2", "13", "13"])
    assert (v.answer, v.votes) == ("$12$", 3)


def test_majority_vote_with_equivalence_merges_groups():
    same_value = lambda a, b: float(a) == float(b)  # noqa: E731
    v = majority_vote(["0.5", "2", ".5", "2", "0.50"], equivalent=same_value)
    assert (v.answer, v.votes, v.members) == ("0.5", 3, (0, 2, 4))


def test_ks_for_keeps_only_reachable_k():
    assert ks_for(1) == [1]
    assert ks_for(16, [1, 4, 8, 32]) == [1, 4, 8]


def test_aggregate_averages_per_problem():
    out = aggregate([(4, 4), (4, 1), (4, 0)], [True, False, False], k=4, ks=[1, 2, 4])
    assert out["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert out["maj@4"] == pytest.approx(1 / 3)
    assert out["pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)


def test_aggregate_skips_problems_without_graded_samples_and_bounds_short_rows():
    # problem 2 lost every sample; problem 1 has 2 of 4 samples, one right: pass@4 counts it solved
    out = aggregate([(4, 0), (2, 1), (0, 0)], [False, True, False], k=4, ks=[1, 4])
    assert out["pass@1"] == pytest.approx((0 + 0.5) / 2)
    assert out["pass@4"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        aggregate([(0, 0)], [False], k=4, ks=[1])
