"""Which blocks go: the per-segment drop budget and the blocks chosen within each segment.

The user asks for a total; SGLP removes it segment by segment (METHOD.md, "How many per
segment"), so every group of similar blocks keeps at least one representative.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from fractions import Fraction

import numpy as np


def allocate_drops(
    segment_sizes: list[int],
    n_drop: int,
    *,
    weights: list[float] | None = None,
    capacity: list[int] | None = None,
) -> list[int]:
    """How many blocks each segment gives up, summing to `n_drop`.

    Shares are proportional to segment size (or to `weights`, e.g. per-segment redundancy) by
    the largest-remainder (Hamilton) method in exact arithmetic; zero-weight segments give only
    what the others cannot, shared by size. Segment i gives up at most
    min(size_i - 1, capacity_i) blocks, so no segment disappears and `capacity` can shield
    protected blocks. A segment whose share reaches its cap gets exactly the cap and the rest
    is shared again among the others by the same rule, until no share exceeds a cap. Leftover
    seats go to the larger remainder, then the larger segment, then the earlier segment.
    """
    k = len(segment_sizes)
    if k == 0:
        raise ValueError("allocate_drops needs at least one segment.")
    if any(not isinstance(s, (int, np.integer)) or s < 1 for s in segment_sizes):
        raise ValueError(f"Segment sizes must be positive integers, got {segment_sizes}.")
    if not isinstance(n_drop, (int, np.integer)) or n_drop < 0:
        raise ValueError(f"n_drop must be a non-negative integer, got {n_drop!r}.")
    if weights is None:
        weights = segment_sizes
    if len(weights) != k:
        raise ValueError(f"Got {len(weights)} weights for {k} segments; give one per segment.")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"Weights must be finite and non-negative, got {list(weights)}.")
    if capacity is None:
        capacity = segment_sizes
    if len(capacity) != k:
        raise ValueError(f"Got {len(capacity)} capacities for {k} segments; give one per segment.")
    if any(c < 0 for c in capacity):
        raise ValueError(f"Capacities must be non-negative, got {list(capacity)}.")
    caps = [min(s - 1, int(c)) for s, c in zip(segment_sizes, capacity)]
    if sum(caps) < n_drop:
        raise ValueError(
            f"Cannot remove {n_drop} blocks from {k} segments: at most {sum(caps)} can be removed "
            "(each segment keeps at least one block, protected blocks stay). Lower --drop or use "
            "fewer segments."
        )

    drops = [0] * k
    open_ = [i for i in range(k) if caps[i] > 0]
    left = n_drop
    while True:
        total = sum(Fraction(weights[i]) for i in open_)
        if open_ and total == 0:  # only zero-weight segments are left to give: by size
            weights, total = segment_sizes, sum(segment_sizes[i] for i in open_)
        quota = {i: left * Fraction(weights[i]) / total for i in open_} if open_ else {}
        full = [i for i in open_ if quota[i] >= caps[i]]
        if not full:
            break
        for i in full:
            drops[i] = caps[i]
            left -= caps[i]
        open_ = [i for i in open_ if i not in full]
    for i in open_:
        drops[i] = math.floor(quota[i])
    order = sorted(open_, key=lambda i: (-(quota[i] - drops[i]), -segment_sizes[i], i))
    for i in order[: left - sum(drops[i] for i in open_)]:
        drops[i] += 1
    return drops


def choose_drops(
    segments: list[list[int]],
    scores: Sequence[float],
    drops_per_segment: list[int],
    *,
    protected: set[int] | frozenset[int] = frozenset(),
) -> list[int]:
    """The blocks to remove: in each segment the `d` lowest-scored unprotected blocks.

    `scores[b]` is block b's importance (higher = keep). Equal scores drop the deeper block
    first: in LLMs deeper blocks are usually the more redundant ones (ShortGPT, Gromov et al.).
    Returns the original block indices, sorted.
    """
    if len(drops_per_segment) != len(segments):
        raise ValueError(
            f"Got {len(drops_per_segment)} drop counts for {len(segments)} segments; give one "
            "per segment (see allocate_drops)."
        )
    if not all(math.isfinite(scores[b]) for seg in segments for b in seg):
        raise ValueError("Block scores contain NaN or inf; rerun the scoring step.")
    dropped: list[int] = []
    for seg, d in zip(segments, drops_per_segment):
        free = [b for b in seg if b not in protected]
        if not 0 <= d <= len(free) or d >= len(seg):
            raise ValueError(
                f"Cannot drop {d} blocks from segment {seg}: {len(free)} are unprotected and at "
                "least one block must stay; allocate with allocate_drops(capacity=...)."
            )
        dropped += sorted(free, key=lambda b: (scores[b], -b))[:d]
    return sorted(dropped)


def best_subset(candidates_scores: dict[tuple[int, ...], float]) -> tuple[int, ...]:
    """The keep-set with the highest score; ties go to the lexicographically smallest keep-set,
    so the choice does not depend on the order candidates were scored in."""
    if not candidates_scores:
        raise ValueError("best_subset got no candidates; enumerate_keep_sets must return some.")
    if not all(math.isfinite(s) for s in candidates_scores.values()):
        raise ValueError("Candidate scores contain NaN or inf; rerun the scoring step.")
    return min(candidates_scores, key=lambda keep: (-candidates_scores[keep], keep))


def _unrank_combination(rank: int, n: int, r: int) -> list[int]:
    """The `rank`-th r-subset of range(n) in itertools.combinations (lexicographic) order."""
    out, start = [], 0
    for slots in range(r, 0, -1):
        for item in range(start, n):
            block = math.comb(n - item - 1, slots - 1)  # subsets whose next element is `item`
            if rank < block:
                out.append(item)
                start = item + 1
                break
            rank -= block
    return out


def enumerate_keep_sets(
    segment: list[int],
    n_keep: int,
    *,
    protected: set[int] | frozenset[int] = frozenset(),
    max_candidates: int,
    seed: int,
) -> list[tuple[int, ...]]:
    """Candidate keep-sets of `n_keep` blocks of `segment`, each containing its protected blocks.

    All of them when there are at most `max_candidates`; otherwise `max_candidates` distinct
    ones drawn uniformly without replacement with random.Random(seed), by rank, so even
    astronomically many candidates are never listed. Sorted tuples, in lexicographic order.
    Protected indices outside the segment are ignored.
    """
    if not isinstance(max_candidates, int) or max_candidates < 1:
        raise ValueError(f"max_candidates must be a positive integer, got {max_candidates!r}.")
    blocks = sorted(segment)
    fixed = [b for b in blocks if b in protected]
    free = [b for b in blocks if b not in protected]
    if not len(fixed) <= n_keep <= len(blocks) or n_keep < 1:
        raise ValueError(
            f"n_keep={n_keep} is impossible for segment {blocks} with protected blocks {fixed}: "
            f"keep between {max(len(fixed), 1)} and {len(blocks)} blocks."
        )
    r = n_keep - len(fixed)
    total = math.comb(len(free), r)
    if total <= max_candidates:
        picks = list(itertools.combinations(range(len(free)), r))
    else:
        rng, ranks = random.Random(seed), set()
        while len(ranks) < max_candidates:
            ranks.add(rng.randrange(total))
        picks = [_unrank_combination(rank, len(free), r) for rank in sorted(ranks)]
    return sorted(tuple(sorted(fixed + [free[p] for p in pick])) for pick in picks)
