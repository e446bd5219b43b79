"""Drop allocation across segments and the choice of blocks within them."""

import itertools
import math

import numpy as np
import pytest

from sglp_llm.selection.select import allocate_drops, best_subset, choose_drops, enumerate_keep_sets

# ---------------------------------------------------------------- allocate_drops


def test_allocate_drops_hand_worked_hamilton():
    # sizes [3, 5, 2], 4 drops: quotas 4*3/10 = 1.2, 4*5/10 = 2.0, 4*2/10 = 0.8 (caps 2, 4, 1).
    # Floors 1, 2, 0 give 3; the 4th seat goes to the largest remainder, 0.8 -> [1, 2, 1].
    assert allocate_drops([3, 5, 2], 4) == [1, 2, 1]


def test_allocate_drops_redistributes_what_a_cap_refuses():
    # Quotas 3, 3, 3; segment 0 may give up only 1, so 8 are shared again by 10:10 -> 4, 4.
    assert allocate_drops([10, 10, 10], 9, capacity=[1, 9, 9]) == [1, 4, 4]
    # Round 1: 10/3 each, segment 0 capped at 1. Round 2: 9 over two -> 4.5 each, segment 1
    # capped at 4. Round 3: segment 2 takes the remaining 5.
    assert allocate_drops([10, 10, 10], 10, capacity=[1, 4, 9]) == [1, 4, 5]


def test_allocate_drops_never_removes_a_whole_segment():
    # Quotas 6*2/9 = 1.33 and 6*7/9 = 4.67: the 2-block segment can give up only 1.
    assert allocate_drops([2, 7], 6) == [1, 5]
    assert allocate_drops([1, 9], 4) == [0, 4]  # a single block cannot go at all


def test_allocate_drops_tie_breaks():
    # Equal remainders (0.5, 0.5) and equal sizes: the earlier segment wins.
    assert allocate_drops([4, 4, 4], 3, capacity=[0, 3, 3]) == [0, 2, 1]
    # Equal remainders via weights, different sizes: the larger segment wins.
    assert allocate_drops([3, 5], 1, weights=[1.0, 1.0]) == [0, 1]
    assert allocate_drops([5, 3], 1, weights=[1.0, 1.0]) == [1, 0]


def test_allocate_drops_weights_replace_sizes():
    assert allocate_drops([4, 4], 4, weights=[3.0, 1.0]) == [3, 1]
    assert allocate_drops([4, 4], 4, weights=[9.0, 1.0]) == [3, 1]  # 3.6 capped at 3
    assert allocate_drops([4, 4], 4, weights=[0.1, 0.3]) == [1, 3]  # only ratios matter


def test_allocate_drops_zero_weight_segments_give_only_what_others_cannot():
    # single blocks have redundancy 0: quotas 9/16 * 6 = 3.375 and 7/16 * 6 = 2.625
    assert allocate_drops([1, 1, 9, 1, 7, 2], 6, weights=[0, 0, 9, 0, 7, 0]) == [0, 0, 3, 0, 3, 0]
    # the weighted segment gives its cap of 8; the remaining 2 are shared by size (3 : 2)
    assert allocate_drops([3, 9, 2], 10, weights=[0, 9, 0]) == [1, 8, 1]
    assert allocate_drops([4, 3], 4, weights=[0, 0]) == allocate_drops([4, 3], 4)


def test_allocate_drops_zero_drops():
    assert allocate_drops([3, 4], 0) == [0, 0]


def test_allocate_drops_properties_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = [int(s) for s in rng.integers(1, 9, size=rng.integers(1, 7))]
        capacity = [int(c) for c in rng.integers(0, 9, size=len(sizes))]
        caps = [min(s - 1, c) for s, c in zip(sizes, capacity)]
        n_drop = int(rng.integers(0, sum(caps) + 1))
        drops = allocate_drops(sizes, n_drop, capacity=capacity)
        assert sum(drops) == n_drop
        assert all(0 <= d <= c for d, c in zip(drops, caps))


def test_allocate_drops_stays_within_one_of_every_quota_when_no_cap_binds():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(300):
        sizes = [int(s) for s in rng.integers(2, 12, size=rng.integers(1, 7))]
        n_drop = int(rng.integers(0, len(sizes) + 1))
        quotas = [n_drop * s / sum(sizes) for s in sizes]
        if any(math.ceil(q) > s - 1 for q, s in zip(quotas, sizes)):
            continue
        checked += 1
        drops = allocate_drops(sizes, n_drop)
        assert all(math.floor(q) <= d <= math.ceil(q) for d, q in zip(drops, quotas))
    assert checked > 100


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([3, 1, 2], 4), {}, r"Cannot remove 4 blocks from 3 segments: at most 3 can be removed.*"
         r"Lower --drop or use fewer segments"),
        (([5, 5], 5), {"capacity": [2, 2]}, r"at most 4 can be removed"),
        (([], 1), {}, "needs at least one segment"),
        (([3, 0], 1), {}, r"Segment sizes must be positive integers, got \[3, 0\]"),
        (([3, 3], -1), {}, "n_drop must be a non-negative integer, got -1"),
        (([3, 3], 1), {"weights": [1.0]}, "Got 1 weights for 2 segments"),
        (([3, 3], 1), {"weights": [1.0, -1.0]}, "Weights must be finite and non-negative"),
        (([3, 3], 1), {"weights": [1.0, float("nan")]}, "Weights must be finite and non-negative"),
        (([3, 3], 1), {"capacity": [1, 1, 1]}, "Got 3 capacities for 2 segments"),
        (([3, 3], 1), {"capacity": [1, -1]}, "Capacities must be non-negative"),
    ],
)
def test_allocate_drops_rejects(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate_drops(*args, **kwargs)


# ---------------------------------------------------------------- choose_drops


SEGMENTS = [[0, 1, 2], [3, 4, 5, 6]]
SCORES = [5.0, 1.0, 3.0, 2.0, 9.0, 0.5, 4.0]


def test_choose_drops_takes_the_lowest_scores_per_segment():
    assert choose_drops(SEGMENTS, SCORES, [1, 2]) == [1, 3, 5]
    assert choose_drops(SEGMENTS, np.array(SCORES), [0, 3]) == [3, 5, 6]


def test_choose_drops_skips_protected_blocks():
    assert choose_drops(SEGMENTS, SCORES, [1, 2], protected={1, 5}) == [2, 3, 6]


def test_choose_drops_ties_drop_the_deeper_block():
    assert choose_drops([[0, 1, 2, 3]], [1.0, 0.0, 1.0, 0.0], [1]) == [3]
    assert choose_drops([[0, 1, 2, 3]], [1.0, 0.0, 1.0, 0.0], [3]) == [1, 2, 3]


def test_choose_drops_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scores = rng.permutation(12).astype(float)
        segments = [list(range(0, 5)), list(range(5, 12))]
        drops = [int(rng.integers(0, 5)), int(rng.integers(0, 7))]
        expected = []
        for seg, d in zip(segments, drops):
            expected += min(itertools.combinations(seg, d), key=lambda c: sum(scores[list(c)]))
        assert choose_drops(segments, scores, drops) == sorted(expected)


@pytest.mark.parametrize(
    "drops, scores, protected, match",
    [
        ([1], SCORES, set(), "Got 1 drop counts for 2 segments"),
        ([1, 1], [float("nan")] + SCORES[1:], set(), "Block scores contain NaN or inf"),
        ([3, 0], SCORES, set(), r"Cannot drop 3 blocks from segment \[0, 1, 2\].*at least one"),
        ([2, 0], SCORES, {0, 1}, r"Cannot drop 2 blocks .*: 1 are unprotected"),
        ([-1, 0], SCORES, set(), r"Cannot drop -1 blocks"),
    ],
)
def test_choose_drops_rejects(drops, scores, protected, match):
    with pytest.raises(ValueError, match=match):
        choose_drops(SEGMENTS, scores, drops, protected=protected)


# ---------------------------------------------------------------- subset search


def test_best_subset_highest_score_ties_to_smallest_keep_set():
    scores = {(1, 2): 3.0, (0, 1): 2.0, (0, 2): 3.0}
    assert best_subset(scores) == (0, 2)
    assert best_subset(dict(reversed(list(scores.items())))) == (0, 2)
    assert best_subset({(4, 5): 1.0, (4, 6): 7.5}) == (4, 6)


@pytest.mark.parametrize(
    "scores, match",
    [({}, "got no candidates"), ({(0,): float("nan")}, "Candidate scores contain NaN or inf")],
)
def test_best_subset_rejects(scores, match):
    with pytest.raises(ValueError, match=match):
        best_subset(scores)


def test_enumerate_keep_sets_is_complete_when_small():
    seg = [7, 3, 4, 5, 6]
    got = enumerate_keep_sets(seg, 3, protected={5, 99}, max_candidates=6, seed=0)
    assert got == [c for c in itertools.combinations([3, 4, 5, 6, 7], 3) if 5 in c]
    assert enumerate_keep_sets(seg, 5, max_candidates=1, seed=0) == [(3, 4, 5, 6, 7)]


def test_enumerate_keep_sets_samples_when_large():
    seg = list(range(10, 22))
    full = [c for c in itertools.combinations(seg, 6) if 10 in c]  # C(11, 5) = 462
    got = enumerate_keep_sets(seg, 6, protected={10}, max_candidates=50, seed=3)
    assert len(got) == 50 == len(set(got))
    assert set(got) <= set(full)
    assert got == sorted(got)
    assert got == enumerate_keep_sets(seg, 6, protected={10}, max_candidates=50, seed=3)
    assert got != enumerate_keep_sets(seg, 6, protected={10}, max_candidates=50, seed=4)
    # All but one candidate: every rank maps to a distinct valid keep-set.
    almost = enumerate_keep_sets(seg, 6, protected={10}, max_candidates=461, seed=0)
    assert len(set(almost)) == 461 and set(almost) < set(full)


def test_enumerate_keep_sets_never_lists_astronomically_many():
    seg = list(range(80))  # C(80, 40) ~ 1e23 candidates, more than an int64 can count
    got = enumerate_keep_sets(seg, 40, max_candidates=8, seed=0)
    assert len(set(got)) == 8
    assert all(len(c) == 40 and set(c) <= set(seg) and list(c) == sorted(c) for c in got)


@pytest.mark.parametrize(
    "n_keep, protected, max_candidates, match",
    [
        (2, set(), 0, "max_candidates must be a positive integer, got 0"),
        (0, set(), 5, r"n_keep=0 is impossible .* keep between 1 and 4 blocks"),
        (5, set(), 5, r"n_keep=5 is impossible .* keep between 1 and 4 blocks"),
        (1, {0, 1}, 5, r"n_keep=1 is impossible .* protected blocks \[0, 1\]: keep between 2"),
    ],
)
def test_enumerate_keep_sets_rejects(n_keep, protected, max_candidates, match):
    with pytest.raises(ValueError, match=match):
        enumerate_keep_sets(
            [0, 1, 2, 3], n_keep, protected=protected, max_candidates=max_candidates, seed=0
        )
