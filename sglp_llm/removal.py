"""The calibration loss of a network with some decoder blocks removed: what SLEB and SGLP's loss
check rank candidate removals by.

`calibration_nll` runs the whole network for every candidate, as SLEB's reference does.
`RemovalLoss` serves a greedy search, where every candidate is "the current network minus one more
block": up to that block nothing changes, so the current network's output there is kept from one
forward and only the blocks after it run. Removing block i then costs the blocks after i and the
head instead of a whole forward, and the number is the same, because the model's own forward
(masks, position embeddings, final norm, head, loss) still runs around stubbed-out blocks.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .blocks import find_decoder_blocks
from .capture import StopForward
from .distributed import all_reduce_state, shard
from .rewrite import skip_blocks
from .score import causal_lm_loss, check_finite
from .sequential import stubbed_blocks


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"][:, 1:].sum())  # the first token is never a target


def _token_mean(weighted: Iterable[tuple[float, int]]) -> float:
    """Mean of per-batch losses weighted by their predicted tokens, summed over processes."""
    total, n_tokens = 0.0, 0
    for loss, count in weighted:
        total += loss * count
        n_tokens += count
    sums = all_reduce_state({"total": total, "n_tokens": n_tokens})
    return sums["total"] / sums["n_tokens"]


def _checked(loss: torch.Tensor, skipped: Sequence[int]) -> float:
    without = f" without blocks {sorted(skipped)}" if skipped else ""
    return check_finite(loss, f"The calibration loss{without}").item()


@torch.no_grad()
def calibration_nll(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    skipped: Sequence[int],
    layers_path: str | None = None,
) -> float:
    """Mean next-token NLL per predicted (non-padding) token over `batches`, with the `skipped`
    blocks removed: each batch's mean loss weighted by its number of predicted tokens.

    Under data parallelism each process runs its share of `batches` and the (loss × count,
    count) sums are reduced, so every process gets the same value and makes the same choice."""
    with skip_blocks(model, skipped, layers_path=layers_path):
        return _token_mean(
            (_checked(causal_lm_loss(model, batch), skipped), _predicted_tokens(batch)) for batch in shard(batches)
        )


class RemovalLoss:
    """`calibration_nll(model, batches, removed + [block])` for the current `removed` set, reusing
    the current network's hidden states: `measure(block)` runs only the blocks after `block`.

    A kept output of block p stays valid while the removed blocks below p stay the same, so a
    greedy step (`remove`) keeps the outputs below the new removal and drops the others, to be
    recomputed from the nearest kept one when next needed (keeping every output on the way, so
    candidates measured in any order share the work). Memory: at most one hidden state per batch
    for each kept block."""

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], layers_path: str | None = None) -> None:
        self.model = model
        self.batches = shard(batches)
        self.layers_path = layers_path
        self.num_blocks = len(find_decoder_blocks(model, layers_path).layers)
        self.removed: list[int] = []
        # kept block -> its raw output in the current network, for each batch
        self._outputs: dict[int, list[Any]] = {}

    def remove(self, block: int) -> None:
        self.removed.append(block)
        # outputs from this block on were computed with it in place
        self._outputs = {p: outputs for p, outputs in self._outputs.items() if p < block}

    def _previous_kept(self, block: int) -> int | None:
        return max((i for i in range(block) if i not in self.removed), default=None)

    def kept_neighbours(self, block: int) -> tuple[int | None, int | None]:
        """The kept blocks just before and after `block` in the current network."""
        after = min((i for i in range(block + 1, self.num_blocks) if i not in self.removed), default=None)
        return self._previous_kept(block), after

    def _nearest_kept_output(self, below: int) -> int | None:
        return max((i for i in self._outputs if i < below), default=None)

    @torch.no_grad()
    def _run(self, skipped: list[int], start: int | None, stop: int | None = None) -> float | None:
        """One pass of the network without `skipped` over the batches, blocks up to `start`
        replaced by its kept output; the loss, or with `stop`, none: the pass ends after that
        block. The outputs of the current network's blocks are kept as they run."""
        kept = [i for i in range(self.num_blocks) if i not in skipped]
        start_position = -1 if start is None else kept.index(start)
        keeping = sorted(skipped) == sorted(self.removed)
        stored: dict[int, list[Any]] = {}
        weighted: list[tuple[float, int]] = []
        batch_index = 0

        def call(position: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
            if position <= start_position:
                return self._outputs[start][batch_index]
            output = block(*args, **kwargs)
            if keeping:
                stored.setdefault(kept[position], []).append(output)
            if kept[position] == stop:
                raise StopForward
            return output

        with skip_blocks(self.model, skipped, layers_path=self.layers_path):
            with stubbed_blocks(find_decoder_blocks(self.model, self.layers_path).layers, call):
                for batch_index, batch in enumerate(self.batches):
                    try:
                        loss = causal_lm_loss(self.model, batch)
                    except StopForward:
                        continue
                    weighted.append((_checked(loss, skipped), _predicted_tokens(batch)))
        self._outputs.update(stored)
        return None if stop is not None else _token_mean(weighted)

    def current(self) -> float:
        """The calibration NLL of the current network, from its deepest kept output."""
        return self._run(list(self.removed), self._nearest_kept_output(self.num_blocks))

    def measure(self, block: int) -> float:
        """The calibration NLL of the current network without `block` as well."""
        if block in self.removed:
            raise ValueError(f"Block {block} is removed already.")
        previous = self._previous_kept(block)
        if previous is not None and previous not in self._outputs:
            self._run(list(self.removed), self._nearest_kept_output(previous), stop=previous)
        return self._run(self.removed + [block], previous)
