"""The original network's block outputs on the first calibration batches, kept from the
statistics pass: a loss check over those batches starts from them instead of running the
network again (one forward where two ran).

The statistics pass runs every block on every calibration batch anyway; the loss check's first
pass ran the same blocks on its first batches again to keep their outputs
(sglp_llm.selection.removal). The outputs kept here are the ones that pass computes, so the loss
check measures the same numbers, one forward over its tokens cheaper.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .distributed import shard

MATCHED_KEYS = ("input_ids", "attention_mask")


class OriginalOutputs:
    """A block observer (sglp_llm.passes.capture.BlockObserver) that keeps every block's output
    on the calibration batches with global index below `n_batches`, detached (on the CPU with
    `to_cpu`: where a model run one block at a time keeps its states; the block-by-block pass then
    hands over the states it stores, `on_host`, so those in memory are not copied). `indices`: the
    global index of each batch this process's pass runs, in order (its share, or those left after
    a resume). `arity` (what the blocks return, `capture.block_arity`) is set by the pass that fed it."""

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]], indices: Sequence[int], n_batches: int,
                 *, to_cpu: bool) -> None:
        self._batches = list(batches[:n_batches])
        self._indices = iter(indices)
        self._to_cpu = self.on_host = to_cpu
        self._current = -1
        self.outputs: dict[int, dict[int, torch.Tensor]] = {}  # block -> global batch index -> its output
        self.arity = 0

    def start_batch(self, token_mask: torch.Tensor) -> None:
        self._current = next(self._indices)

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        if self._current < len(self._batches):
            kept = block_output.detach()
            self.outputs.setdefault(index, {})[self._current] = kept.cpu() if self._to_cpu else kept

    def finish_batch(self) -> None:
        pass

    def compute(self) -> "OriginalOutputs":
        return self

    def for_batches(self, batches: Sequence[dict[str, torch.Tensor]], first_row: int = 0) -> dict[int, list[torch.Tensor]] | None:
        """Each block's kept outputs on this process's share of `batches` (sharded as
        sglp_llm.selection.removal shards them), when `batches` are the kept batches' rows in order
        from row `first_row` of them all on, each within one kept batch (cut at any row:
        `data.first_tokens`, a loss check's halves); None otherwise, or when a kept batch was not
        run here."""
        if not self.outputs:
            return None
        where = []  # each batch's kept batch and rows in it
        kept_index, row = 0, first_row
        for batch in batches:
            while kept_index < len(self._batches) and row >= len(self._batches[kept_index]["input_ids"]):
                row -= len(self._batches[kept_index]["input_ids"])
                kept_index += 1
            if kept_index == len(self._batches):
                return None
            kept, n = self._batches[kept_index], len(batch["input_ids"])
            if row + n > len(kept["input_ids"]) or not all(
                key in batch and torch.equal(batch[key].cpu(), kept[key][row:row + n].cpu()) for key in MATCHED_KEYS
            ):
                return None
            where.append((kept_index, row, row + n))
            row += n
        mine = shard(range(len(batches)))
        if any(where[b][0] not in per_batch for per_batch in self.outputs.values() for b in mine):
            return None
        return {block: [per_batch[where[b][0]][where[b][1]:where[b][2]] for b in mine] for block, per_batch in self.outputs.items()}
