"""SGLP's selections: the Fisher groups of similar blocks (stage 2), then which blocks each group
gives up (stage 3), by one of three registered rules (`scoring`):

- "sglp-loss" (the default): the gradient score ranks each group's blocks and the calibration
  loss confirms the first few, one removal at a time (sglp_llm.selection.loss_check);
- "sglp-block": the lowest-scored blocks of each group go, by the gradient score alone;
- "sglp-subset": the paper's search, keeping in each group the subset whose pruned network has
  the highest GradNorm.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .baselines import BlockInfluence
from .loss_check import held_back_search, loss_check
from ..model.rewrite import skip_blocks
from ..statistics.score import network_gradnorm
from .segment import SegmentationResult, redundancy, segment_blocks
from .select import allocate_drops, best_subset, choose_drops, enumerate_keep_sets
from ..config import SGLPConfig
from .registry import Selection, SelectionContext, Selector, register

# what the group stage reads; each rule adds its own
GROUP_SETTINGS = (
    "groups", "num_segments", "max_segments", "segment_feature", "auto_k", "auto_k_threshold", "min_segment_size", "allocation",
)


@dataclass
class Groups:
    """Stage 2's result: the segments, the drops allocated to each, how many each may give up at
    most, and the segmentation (k, losses)."""

    segments: list[list[int]]
    drops: list[int]
    capacities: list[int]
    segmentation: SegmentationResult
    seconds: float


def _capacities(segments: list[list[int]], protected: set[int]) -> list[int]:
    """How many blocks each segment may give up: never all of it, never a protected block."""
    return [min(len(s) - 1, sum(1 for i in s if i not in protected)) for s in segments]


def _segment(cka: torch.Tensor, config: SGLPConfig, n_drop: int, protected: set[int]) -> SegmentationResult:
    """Fisher segmentation; an automatic k is lowered until the drop count fits the segments."""
    kwargs = dict(
        feature=config.segment_feature, threshold=config.auto_k_threshold,
        auto_k=config.auto_k, min_size=config.min_segment_size,
    )
    result = segment_blocks(
        cka.numpy(), num_segments=config.num_segments, max_segments=config.max_segments, **kwargs
    )
    while config.num_segments is None and result.k > 1 and sum(_capacities(result.segments, protected)) < n_drop:
        result = segment_blocks(cka.numpy(), num_segments=result.k - 1, **kwargs)
    return result


def groups(context: SelectionContext) -> Groups:
    """The Fisher groups, or with `groups` off one group of every block (no segmentation)."""
    config, n_drop, protected = context.config, context.n_drop, context.protected
    started = time.perf_counter()
    if not config.uses_groups:
        whole = list(range(len(context.scores)))
        return Groups([whole], [n_drop], _capacities([whole], protected),
                      SegmentationResult([whole], 1, [], "none"), time.perf_counter() - started)
    segmentation = _segment(context.cka, config, n_drop, protected)
    segments = segmentation.segments
    weights = None
    if config.drop_allocation == "redundancy":
        cka = context.cka.numpy()
        weights = [len(s) * redundancy(cka, s) for s in segments]
    capacities = _capacities(segments, protected)
    drops = allocate_drops([len(s) for s in segments], n_drop, weights=weights, capacity=capacities)
    return Groups(segments, drops, capacities, segmentation, time.perf_counter() - started)


def _selection(context: SelectionContext, found: Groups, dropped: list[int], extra: dict[str, Any],
               drops: list[int] | None = None) -> Selection:
    """A grouped choice as a Selection: the gradient score as the plan's scores."""
    grouped = context.config.uses_groups
    return Selection(
        sorted(dropped), context.scores, context.config.gradient_score, {"k": found.segmentation.k, **extra} if grouped else extra,
        segments=found.segments, drops=found.drops if drops is None else drops,
        segmentation_losses=list(found.segmentation.losses), timings={"segmentation_s": found.seconds} if grouped else {},
    )


def _per_block(context: SelectionContext) -> Selection:
    found = groups(context)
    dropped = choose_drops(found.segments, context.scores, found.drops, protected=context.protected)
    return _selection(context, found, dropped, {})


def _subset_search(context: SelectionContext) -> Selection:
    """The paper's selection: in each segment keep the subset whose pruned network has the
    highest GradNorm (other segments intact)."""
    found = groups(context)
    handle, config, protected = context.handle, context.config, context.protected
    batches = context.batches[: config.subset_batches]
    dropped: list[int] = []
    searched: dict[str, Any] = {}
    for segment, n_drop in zip(found.segments, found.drops):
        if n_drop == 0:
            continue
        keep_sets = enumerate_keep_sets(
            segment, len(segment) - n_drop, protected=protected,
            max_candidates=config.max_candidates, seed=config.seed,
        )
        scores = {}
        desc = f"SGLP subset search {segment[0]}-{segment[-1]}"
        for keep in tqdm(keep_sets, desc=desc, disable=not context.progress):
            with skip_blocks(handle, [i for i in segment if i not in keep]):
                scores[tuple(keep)] = network_gradnorm(handle.model, batches)
        best = best_subset(scores)
        dropped += [i for i in segment if i not in best]
        searched[f"{segment[0]}-{segment[-1]}"] = {
            "candidates": len(scores), "best_keep": list(best), "best_score": scores[best],
        }
    return _selection(context, found, dropped, {"subset_search": searched})


def _loss(context: SelectionContext) -> Selection:
    found = groups(context)
    config = context.config
    budgets = found.capacities if config.drop_allocation == "loss" else found.drops
    if config.loss_beam > 1:
        dropped, checked = held_back_search(context)
    else:
        dropped, checked = loss_check(context, found.segments, budgets)
    drops = [sum(1 for b in dropped if b in s) for s in found.segments]
    # the loss check's own stability check (its search on each half of its sequences): timed apart
    stability = checked.pop("stability", None)
    selection = _selection(context, found, dropped, {"loss_check": checked, **({"stability": stability} if stability else {})}, drops)
    if stability and "seconds" in stability:
        selection.timings["stability_s"] = stability["seconds"]
    if not config.needs_backward:  # no gradient score: the loss check measured every candidate at its first step
        selection.scores = [math.nan if x is None else x for x in checked["removal_losses"]]
        selection.score_kind = "loss_without_block"
    return selection


LOSS_SETTINGS = ("loss_candidates", "loss_tokens", "loss_positions", "loss_vocabulary", "loss_objective", "loss_beam", "loss_confirm", "loss_ties", "loss_lazy", "loss_bound", "loss_screen", "loss_screen_samples")
# every SGLP choice may be put against peers' on held-back tokens (analyze; sglp_llm.selection.decide)
DECISION_SETTINGS = ("decide_among", "loss_tokens")
register("sglp-block", Selector(None, _per_block, (*GROUP_SETTINGS, "gradient_score", *DECISION_SETTINGS)))
register("sglp-subset", Selector(None, _subset_search, (*GROUP_SETTINGS, "max_candidates", "subset_batches", *DECISION_SETTINGS)))
# the loss check's pass also measures block influence: what settles its near-ties (loss_ties)
register("sglp-loss", Selector(lambda num_blocks, _n_drop: BlockInfluence(num_blocks), _loss,
                               (*GROUP_SETTINGS, "gradient_score", *LOSS_SETTINGS, "decide_among")))
