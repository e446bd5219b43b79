"""Fisher segmentation against brute force over every contiguous partition."""

import itertools

import numpy as np
import pytest

from sglp_llm.selection.segment import (
    DEFAULT_MAX_SEGMENTS,
    choose_k,
    diameter_table,
    fisher_segmentation,
    loss_curve,
    segment_blocks,
    segment_features,
)


def direct_diameter(x):
    return float(((x - x.mean(axis=0)) ** 2).sum())


def brute_force(x, k, min_size=1):
    """Best partition over all cut sets; unique with probability 1 for random x."""
    length = len(x)
    best = None
    for cuts in itertools.combinations(range(1, length), k - 1):
        bounds = (0, *cuts, length)
        segs = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
        if min(len(s) for s in segs) < min_size:
            continue
        loss = sum(direct_diameter(x[s]) for s in segs)
        if best is None or loss < best[1]:
            best = (segs, loss)
    return best


def blocky_cka(sizes, within=1.0, between=0.2):
    """A CKA matrix of groups of identical blocks."""
    length = sum(sizes)
    cka = np.full((length, length), between)
    start = 0
    for size in sizes:
        cka[start : start + size, start : start + size] = within
        start += size
    return cka


# ---------------------------------------------------------------- features


def test_segment_features_column_sums_and_rows():
    cka = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]])
    assert np.allclose(segment_features(cka, "column_sum"), [[1.6], [1.8], [1.4]])
    rows = segment_features(cka, "rows")
    assert np.array_equal(rows, cka)
    rows[0, 0] = 7.0
    assert cka[0, 0] == 1.0  # a copy, not a view


@pytest.mark.parametrize(
    "cka, match",
    [
        (np.ones((2, 3)), "must be square"),
        (np.ones(3), "must be square"),
        (np.zeros((0, 0)), "must be square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN or inf; recompute"),
    ],
)
def test_bad_cka_is_rejected(cka, match):
    with pytest.raises(ValueError, match=match):
        segment_features(cka, "column_sum")


def test_unknown_feature_is_rejected():
    with pytest.raises(ValueError, match=r"Unknown segmentation feature 'mean'; use one of"):
        segment_features(np.eye(2), "mean")


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 2, 2)), r"Features must be \[L\] or \[L, d\]"),
        (np.zeros(0), r"Features must be \[L\] or \[L, d\]"),
        (np.array([1.0, np.inf]), "Features contain NaN or inf"),
    ],
)
def test_bad_features_are_rejected(x, match):
    with pytest.raises(ValueError, match=match):
        diameter_table(x)


# ---------------------------------------------------------------- diameter


@pytest.mark.parametrize("d", [1, 4])
def test_diameter_table_equals_direct_formula(d):
    rng = np.random.default_rng(d)
    x = rng.normal(size=(11, d)) + 50.0  # an offset, like CKA column sums
    table = diameter_table(x)
    for i in range(11):
        for j in range(11):
            if i <= j:
                assert table[i, j] == pytest.approx(direct_diameter(x[i : j + 1]), abs=1e-9)
            else:
                assert np.isnan(table[i, j])


def test_diameter_table_accepts_a_1d_series():
    x = np.array([0.0, 1.0, 3.0])
    assert np.allclose(diameter_table(x), diameter_table(x[:, None]), equal_nan=True)
    assert diameter_table(x)[0, 2] == pytest.approx(14 / 3)  # mean 4/3: 16/9 + 1/9 + 25/9


def test_rounding_noise_counts_as_zero_diameter():
    # Columns of equal values summed in different orders differ only by rounding.
    sums = segment_features(blocky_cka([3, 3, 3]), "column_sum")
    assert np.ptp(sums) < 1e-12
    assert np.all(np.triu(diameter_table(sums)) == 0.0)


# ---------------------------------------------------------------- dynamic programme


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("min_size", [1, 2, 3])
def test_dp_equals_brute_force(d, min_size):
    rng = np.random.default_rng(10 * d + min_size)
    for length in range(min_size, 10):
        x = rng.normal(size=(length, d))
        curve = loss_curve(x, length // min_size, min_size)
        for k in range(1, length // min_size + 1):
            segs, loss = fisher_segmentation(x, k, min_size=min_size)
            best_segs, best_loss = brute_force(x, k, min_size)
            assert segs == best_segs, (length, k)
            assert loss == pytest.approx(best_loss, abs=1e-9)
            assert curve[k - 1] == pytest.approx(best_loss, abs=1e-9)


def test_ties_go_to_the_earliest_start_of_the_last_segment():
    # Any partition that cuts between 2 and 3 costs 0; the rule picks the last segment
    # starting at 3 (not 4 or 5), then block 1 (not 2) to start the middle one.
    x = np.array([0.0, 0, 0, 5, 5, 5])
    assert fisher_segmentation(x, 3) == ([[0], [1, 2], [3, 4, 5]], 0.0)
    assert fisher_segmentation(np.zeros(7), 3, min_size=2)[0] == [[0, 1], [2, 3], [4, 5, 6]]


def test_loss_curve_is_non_increasing():
    x = np.random.default_rng(0).normal(size=(20, 2))
    curve = loss_curve(x, 20)
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    assert curve[0] == pytest.approx(direct_diameter(x))
    assert curve[-1] == 0.0  # every block alone


def test_loss_curve_can_rise_under_min_size():
    # Two segments fit the groups exactly; three segments of >= 2 must split a group.
    x = np.array([0.0, 0, 0, 9, 9, 9])
    assert loss_curve(x, 3, min_size=2) == pytest.approx([121.5, 0.0, 40.5])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: fisher_segmentation(x, 0), "k must be a positive integer, got 0"),
        (lambda x: fisher_segmentation(x, 7), r"k=7 is too many: 6 blocks .* at most 6; lower k"),
        (
            lambda x: fisher_segmentation(x, 3, min_size=4),
            r"k=3 is too many: 6 blocks split into segments of at least 4 allow at most 1",
        ),
        (lambda x: fisher_segmentation(x, 1, min_size=0), "min_size must be a positive integer"),
        (lambda x: fisher_segmentation(x, 1, min_size=7), r"min_size=7 is larger than .* \(6\)"),
        (lambda x: loss_curve(x, 8), r"k_max=8 is too many"),
    ],
)
def test_bad_k_is_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.arange(6.0))


# ---------------------------------------------------------------- choosing k


@pytest.mark.parametrize(
    "losses, expected",
    [
        ([5.0], 1),
        ([100.0, 50.0, 48.0, 47.0], 2),  # 50 %, then 4 %: stop at 2
        ([100.0, 60.0, 30.0, 29.0], 3),  # 40 %, 50 %, then ~3 %
        ([100.0, 97.0, 50.0], 1),  # a small step stops the scan though a large one follows
        ([100.0, 50.0, 49.0, 0.0], 2),  # reaching 0 at k = L does not force k = L
        ([10.0, 0.0, 0.0], 2),  # from 0 no step can count
        ([0.0, 0.0], 1),
        ([10.0, 12.0], 1),  # a rise (possible with min_size) never counts
    ],
)
def test_choose_k_on_hand_made_curves(losses, expected):
    assert choose_k(losses) == expected


def test_choose_k_threshold_is_strict_and_relative_to_the_previous_loss():
    assert choose_k([100.0, 75.0], threshold=0.25) == 1  # 25 % is not more than 25 %
    assert choose_k([100.0, 74.0], threshold=0.25) == 2
    assert choose_k([100.0, 74.0, 55.0], threshold=0.25) == 3  # 26 % of 100, 25.7 % of 74
    assert choose_k([100.0, 74.0, 56.0], threshold=0.25) == 2  # 18 is 24.3 % of 74
    assert choose_k([100.0, 99.0, 98.0], threshold=0.0) == 3  # any strict drop


@pytest.mark.parametrize(
    "losses, threshold, match",
    [
        ([], 0.05, "needs the loss for at least k = 1"),
        ([1.0], 1.0, r"threshold must be in \[0, 1\)"),
        ([1.0], -0.1, r"threshold must be in \[0, 1\)"),
    ],
)
def test_choose_k_rejects(losses, threshold, match):
    with pytest.raises(ValueError, match=match):
        choose_k(losses, threshold)


# ---------------------------------------------------------------- segment_blocks


def test_segment_blocks_finds_groups_of_similar_blocks():
    result = segment_blocks(blocky_cka([2, 3, 4]))
    assert result.k == 3
    assert result.segments == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    assert result.feature == "column_sum"
    assert len(result.losses) == 9  # k_max = min(L, 16)
    assert result.losses[2:] == [0.0] * 7


def test_rows_feature_separates_groups_column_sums_cannot():
    # Equal-size groups have equal column sums, so only the rows tell them apart.
    cka = blocky_cka([4, 4, 4, 4])
    assert segment_blocks(cka, feature="column_sum").k == 1
    rows = segment_blocks(cka, feature="rows")
    assert rows.segments == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert rows.feature == "rows"


def test_segment_blocks_fixed_k_matches_fisher_segmentation():
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(12, 12))
    cka = (a + a.T) / 2
    for feature in ("column_sum", "rows"):
        x = segment_features(cka, feature)
        result = segment_blocks(cka, feature=feature, num_segments=4, min_size=2)
        assert result.k == 4
        assert result.segments == fisher_segmentation(x, 4, min_size=2)[0]
        assert result.losses == pytest.approx(loss_curve(x, 4, min_size=2))


def test_segment_blocks_auto_uses_choose_k_on_the_curve():
    a = np.random.default_rng(4).normal(scale=0.02, size=(12, 12))
    cka = blocky_cka([2, 3, 4, 3]) + (a + a.T) / 2
    result = segment_blocks(cka, feature="rows", threshold=0.3)
    assert result.losses == pytest.approx(loss_curve(segment_features(cka, "rows"), 12))
    assert result.k == choose_k(result.losses, 0.3) == 4
    assert result.segments == [[0, 1], [2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]


def test_segment_blocks_max_segments_is_clipped_to_what_fits():
    assert len(segment_blocks(blocky_cka([10, 10])).losses) == DEFAULT_MAX_SEGMENTS
    cka = blocky_cka([3, 3])
    assert len(segment_blocks(cka).losses) == 6
    assert len(segment_blocks(cka, max_segments=5).losses) == 5
    assert len(segment_blocks(cka, max_segments=10, min_size=2).losses) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_segments": 0}, "num_segments must be a positive integer, got 0"),
        ({"num_segments": 4, "min_size": 2}, r"num_segments=4 is too many: 6 blocks"),
        ({"max_segments": 0}, "max_segments must be a positive integer, got 0"),
        ({"min_size": 7}, r"min_size=7 is larger than the number of blocks \(6\)"),
    ],
)
def test_segment_blocks_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        segment_blocks(blocky_cka([3, 3]), **kwargs)


def test_elbow_picks_the_bend_of_the_curve():
    from sglp_llm.selection.segment import choose_k_elbow

    # scaled: k=1..5 -> x = 0, .25, .5, .75, 1; drop = 0, .8, .9, .95, 1 -> drop - x peaks at k=2
    assert choose_k_elbow([10.0, 2.0, 1.0, 0.5, 0.0]) == 2
    assert choose_k_elbow([10.0, 9.0, 1.0, 0.5, 0.0]) == 3
    assert choose_k_elbow([5.0, 5.0, 5.0]) == 1
    assert choose_k_elbow([4.0]) == 1
    with pytest.raises(ValueError, match="at least k = 1"):
        choose_k_elbow([])


def test_segment_blocks_elbow_and_min_size():
    from sglp_llm.selection.segment import segment_blocks

    groups = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    cka = np.array([[1.0 if a == b else 0.2 for b in groups] for a in groups])
    cka += 0.01 * np.random.default_rng(0).standard_normal(cka.shape)
    result = segment_blocks(cka, feature="rows", auto_k="elbow", max_segments=8)
    assert result.segments == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert all(len(s) >= 4 for s in segment_blocks(cka, num_segments=2, min_size=4).segments)
    with pytest.raises(ValueError, match="auto_k must be 'reference' or 'elbow'"):
        segment_blocks(cka, auto_k="knee")


def test_redundancy_is_the_mean_off_diagonal_cka():
    from sglp_llm.selection.segment import redundancy

    cka = np.array([[1.0, 0.9, 0.5], [0.9, 1.0, 0.7], [0.5, 0.7, 1.0]])
    assert redundancy(cka, [0, 1, 2]) == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    assert redundancy(cka, [1, 2]) == pytest.approx(0.7)
    assert redundancy(cka, [2]) == 0.0
