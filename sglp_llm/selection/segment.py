"""Fisher optimal segmentation of decoder blocks into contiguous groups of similar blocks.

Blocks form an ordered sequence, so SGLP groups them by an exact dynamic programme over
contiguous partitions (METHOD.md, "Partition") instead of clustering, which could mix depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import SEGMENT_FEATURES

DEFAULT_MAX_SEGMENTS = 16
ROUNDING_RTOL = 1e-12


@dataclass
class SegmentationResult:
    """The chosen partition and the evidence for it (the loss curve goes into the report)."""

    segments: list[list[int]]
    k: int
    losses: list[float]  # optimal loss for k = 1..len(losses)
    feature: str


def _check_cka(cka: np.ndarray) -> np.ndarray:
    cka = np.asarray(cka, dtype=np.float64)
    if cka.ndim != 2 or cka.shape[0] != cka.shape[1] or cka.shape[0] == 0:
        raise ValueError(
            f"The CKA matrix must be square [L, L] with L >= 1 (one row per block), got shape "
            f"{cka.shape}; pass the matrix from sglp_llm.statistics.cka unchanged."
        )
    if not np.all(np.isfinite(cka)):
        raise ValueError(
            "The CKA matrix contains NaN or inf; recompute it (a block with constant output, or "
            "too few calibration tokens, makes CKA undefined)."
        )
    return cka


def _check_features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            f"Features must be [L] or [L, d] with L >= 1 (one row per block), got shape {x.shape}."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("Features contain NaN or inf; recompute the CKA matrix they came from.")
    return x


def segment_features(cka: np.ndarray, feature: str) -> np.ndarray:
    """Per-block feature rows: the paper's CKA column sums [L, 1] or the CKA rows [L, L]."""
    cka = _check_cka(cka)
    if feature == "column_sum":
        return cka.sum(axis=0)[:, None]
    if feature == "rows":
        return cka.copy()
    raise ValueError(f"Unknown segmentation feature {feature!r}; use one of {SEGMENT_FEATURES}.")


def diameter_table(x: np.ndarray) -> np.ndarray:
    """D[i, j] = sum_{t=i..j} ||x_t - mean(x_i..x_j)||^2 for i <= j (NaN below the diagonal).

    Uses D = sum ||x_t||^2 - ||sum x_t||^2 / n from prefix sums, O(L^2 d), on centred features
    (D is translation invariant) to limit cancellation. Values within rounding error of zero
    (<= 1e-12 * sum_t ||x_t||^2) are set to 0: blocks with equal features (up to the rounding
    of the CKA sums) then form zero-loss segments and exact ties, instead of noise that the
    relative rule of `choose_k` would read as real improvement.
    """
    x = _check_features(x)
    length = x.shape[0]
    xc = x - x.mean(axis=0)
    p1 = np.concatenate([np.zeros((1, xc.shape[1])), np.cumsum(xc, axis=0)])
    p2 = np.concatenate([[0.0], np.cumsum(np.einsum("td,td->t", xc, xc))])
    i, j = np.triu_indices(length)
    n = (j - i + 1).astype(np.float64)
    s1 = p1[j + 1] - p1[i]
    diam = p2[j + 1] - p2[i] - np.einsum("pd,pd->p", s1, s1) / n
    diam[diam <= ROUNDING_RTOL * np.einsum("td,td->", x, x)] = 0.0
    d = np.full((length, length), np.nan)
    d[i, j] = diam
    return d


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_k(k: int, length: int, min_size: int, name: str) -> None:
    _check_positive(min_size, "min_size")
    _check_positive(k, name)
    if min_size > length:
        raise ValueError(
            f"min_size={min_size} is larger than the number of blocks ({length}); lower min_size."
        )
    if k > length // min_size:
        raise ValueError(
            f"{name}={k} is too many: {length} blocks split into segments of at least {min_size} "
            f"allow at most {length // min_size}; lower {name} or min_size."
        )


def _fisher_dp(x: np.ndarray, k_max: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """cost[k, e]: optimal loss of the first e blocks in k segments; start[k, e]: where the last
    of those segments begins. The earliest optimal start wins exact ties (np.argmin).
    Callers validate k_max and min_size, so messages name the argument the user gave."""
    diam = diameter_table(x)
    length = diam.shape[0]
    cost = np.full((k_max + 1, length + 1), np.inf)
    cost[0, 0] = 0.0
    start = np.zeros((k_max + 1, length + 1), dtype=np.int64)
    for k in range(1, k_max + 1):
        for end in range(k * min_size, length + 1):
            starts = np.arange(0, end - min_size + 1)
            total = cost[k - 1, starts] + diam[starts, end - 1]
            best = int(np.argmin(total))
            cost[k, end], start[k, end] = total[best], starts[best]
    return cost, start


def _backtrack(start: np.ndarray, k: int, length: int) -> list[list[int]]:
    segments, end = [], length
    for kk in range(k, 0, -1):
        begin = int(start[kk, end])
        segments.append(list(range(begin, end)))
        end = begin
    return segments[::-1]


def fisher_segmentation(
    x: np.ndarray, k: int, *, min_size: int = 1
) -> tuple[list[list[int]], float]:
    """Exact optimal split of blocks 0..L-1 into k contiguous segments of >= min_size blocks.

    Returns (segments, total diameter). Tie-break among equally good partitions: the last
    segment starts as early as possible, then the same rule recursively on the blocks before it.
    """
    x = _check_features(x)
    _check_k(k, x.shape[0], min_size, "k")
    cost, start = _fisher_dp(x, k, min_size)
    return _backtrack(start, k, x.shape[0]), float(cost[k, x.shape[0]])


def loss_curve(x: np.ndarray, k_max: int, min_size: int = 1) -> list[float]:
    """Optimal loss for k = 1..k_max from one DP pass (non-increasing in k when min_size=1)."""
    x = _check_features(x)
    _check_k(k_max, x.shape[0], min_size, "k_max")
    cost, _ = _fisher_dp(x, k_max, min_size)
    return [float(c) for c in cost[1:, x.shape[0]]]


def choose_k(losses: list[float], threshold: float = 0.05) -> int:
    """The largest k such that every step up to it still lowered the loss by more than
    `threshold` relative to the loss before the step.

    losses[i] is the loss for k = i + 1. Step k (k >= 2) counts when
    loss(k-1) - loss(k) > threshold * loss(k-1); k grows while steps count and stops at the
    first one that does not (a loss of 0 cannot drop, so the scan stops there). Returns 1 when
    step 2 already fails. Stopping at the first failed step, not taking the largest passing step
    anywhere, matters: the last step to k = L always reaches 0, a 100 % drop.
    """
    if len(losses) == 0:
        raise ValueError("choose_k needs the loss for at least k = 1; got an empty list.")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (a relative loss drop), got {threshold!r}.")
    k = 1
    while k < len(losses) and losses[k - 1] - losses[k] > threshold * losses[k - 1]:
        k += 1
    return k


def choose_k_elbow(losses: list[float]) -> int:
    """The elbow of the loss curve: the k farthest below the straight line from (1, loss(1)) to
    (k_max, loss(k_max)), on axes scaled to [0, 1]. Unlike the 5 % rule it does not keep
    splitting while small losses still drop by large fractions. Ties: the smaller k."""
    if len(losses) == 0:
        raise ValueError("choose_k_elbow needs the loss for at least k = 1; got an empty list.")
    span = losses[0] - losses[-1]
    if len(losses) < 3 or span <= 0:
        return 1
    ks = np.arange(len(losses)) / (len(losses) - 1)
    drop = (losses[0] - np.asarray(losses)) / span
    return int(np.argmax(drop - ks)) + 1


def segment_blocks(
    cka: np.ndarray,
    *,
    feature: str = "column_sum",
    num_segments: int | None = None,
    max_segments: int | None = None,
    threshold: float = 0.05,
    min_size: int = 1,
    auto_k: str = "reference",
) -> SegmentationResult:
    """Partition blocks from their CKA matrix, with a fixed k or the reference automatic rule.

    With `num_segments` the partition has exactly that many segments. Otherwise k is chosen by
    `choose_k` (auto_k="reference", the paper's 5 % rule) or `choose_k_elbow` (auto_k="elbow")
    over k = 1..k_max, k_max = max_segments (default 16), clipped to L // min_size,
    the most segments the blocks allow; a model smaller than the default thus still works.
    """
    x = segment_features(cka, feature)
    length = x.shape[0]
    if num_segments is not None:
        _check_k(num_segments, length, min_size, "num_segments")
        k_max = num_segments
    else:
        k_max = DEFAULT_MAX_SEGMENTS if max_segments is None else max_segments
        _check_positive(k_max, "max_segments")
        k_max = min(k_max, max(length // min_size, 1))
        _check_k(k_max, length, min_size, "max_segments")
    cost, start = _fisher_dp(x, k_max, min_size)
    losses = [float(c) for c in cost[1:, length]]
    if num_segments is not None:
        k = num_segments
    elif auto_k == "elbow":
        k = choose_k_elbow(losses)
    elif auto_k == "reference":
        k = choose_k(losses, threshold)
    else:
        raise ValueError(f"auto_k must be 'reference' or 'elbow', got {auto_k!r}.")
    return SegmentationResult(_backtrack(start, k, length), k, losses, feature)


def redundancy(cka: np.ndarray, segment: list[int]) -> float:
    """Mean CKA between distinct blocks of `segment` (0 for a single block): how alike, and so
    how interchangeable, its blocks are."""
    if len(segment) < 2:
        return 0.0
    block = np.asarray(cka)[np.ix_(segment, segment)]
    return float((block.sum() - np.trace(block)) / (len(segment) * (len(segment) - 1)))
