"""Peer depth-pruning methods, run through SGLP's own pipeline (same calibration data, same hooked
forward pass, same rewrite and save), so a comparison differs only in how blocks are chosen:

- "block-influence": ShortGPT (Men et al. 2024, arXiv:2403.03853), drop the n blocks whose output
  is closest in angle to their input;
- "angular": Gromov et al. 2024 (arXiv:2403.17887), drop the contiguous run of n blocks whose
  input and output are closest in angle;
- "last": drop the n deepest unprotected blocks (with protect_last=1, the n before the final one);
- "random": drop n unprotected blocks drawn with random.Random(seed).

Baselines do not segment: their plan has one segment holding every block.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .capture import BlockObserver
from .select import choose_drops


def _rows(hidden: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows `index` of `hidden` [batch, seq, hidden] flattened to [batch*seq, hidden]."""
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    return flat[index.to(flat.device)].to(dtype)


class BlockInfluence:
    """ShortGPT's Block Influence (Men et al. 2024): BI_l = 1 − mean cos(h_in_l, h_out_l) over all
    non-padding calibration tokens; a block with low BI barely changes its input."""

    def __init__(self, num_blocks: int) -> None:
        self.cos_sum = torch.zeros(num_blocks, dtype=torch.float64)
        self.n_tokens = 0
        self._positions = torch.empty(0, dtype=torch.long)

    def start_batch(self, token_mask: torch.Tensor) -> None:
        self._positions = token_mask.reshape(-1).nonzero().squeeze(-1)

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        # per-token cosines in float32 (BI is linear in them), summed in float64
        cos = F.cosine_similarity(
            _rows(block_input, self._positions, torch.float32),
            _rows(block_output, self._positions, torch.float32),
            dim=-1,
        )
        self.cos_sum[index] += cos.double().sum().cpu()

    def finish_batch(self) -> None:
        self.n_tokens += len(self._positions)

    def compute(self) -> torch.Tensor:
        return 1.0 - self.cos_sum / self.n_tokens


class AngularDistance:
    """Gromov et al. 2024: d(l) = arccos(cos(x_l, x_{l+n}))/π between the input of block l and the
    output of block l+n−1, on the last non-padding token of each sequence (the paper's "final
    token T", as in its reference code), averaged over sequences.

    Streams: within a batch only the last-token states of the block inputs whose run is still
    open are held (at most n of them, [batch, hidden] each), never a full hidden state.
    """

    def __init__(self, num_blocks: int, run_length: int) -> None:
        self.num_blocks = num_blocks
        self.run_length = run_length
        self.sums = torch.zeros(num_blocks - run_length + 1, dtype=torch.float64)
        self.n_sequences = 0
        self._last = torch.empty(0, dtype=torch.long)
        self._window: dict[int, torch.Tensor] = {}

    def start_batch(self, token_mask: torch.Tensor) -> None:
        mask = token_mask.bool()
        seq = mask.shape[1]
        last = seq - 1 - mask.flip(-1).int().argmax(-1)  # last non-padding position of each row
        rows = mask.any(-1)
        self._last = (torch.arange(mask.shape[0], device=mask.device) * seq + last)[rows]
        self._window = {}

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        # float64: arccos is ill-conditioned near cos = 1, where the deep blocks' distances lie
        if index < len(self.sums):
            self._window[index] = _rows(block_input, self._last, torch.float64)
        start = index + 1 - self.run_length
        if start >= 0:
            cos = F.cosine_similarity(
                self._window.pop(start), _rows(block_output, self._last, torch.float64), dim=-1
            )
            self.sums[start] += (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).sum().cpu()

    def finish_batch(self) -> None:
        self.n_sequences += len(self._last)

    def compute(self) -> torch.Tensor:
        """The distance of the run starting at each block; NaN where no run of n blocks starts."""
        distances = torch.full((self.num_blocks,), math.nan, dtype=torch.float64)
        distances[: len(self.sums)] = self.sums / self.n_sequences
        return distances


# choose(scores, n_drop, protected, seed) -> sorted original indices of the blocks to drop
Chooser = Callable[[list[float], int, set[int], int], list[int]]


def _lowest_influence(scores: list[float], n_drop: int, protected: set[int], seed: int) -> list[int]:
    return choose_drops([list(range(len(scores)))], scores, [n_drop], protected=protected)


def _closest_run(scores: list[float], n_drop: int, protected: set[int], seed: int) -> list[int]:
    """The unprotected run with the smallest distance; a tie goes to the deeper run."""
    starts = [
        s for s in range(len(scores) - n_drop + 1) if protected.isdisjoint(range(s, s + n_drop))
    ]
    best = min(starts, key=lambda s: (scores[s], -s))
    return list(range(best, best + n_drop))


def _unprotected(num_blocks: int, protected: set[int]) -> list[int]:
    return [i for i in range(num_blocks) if i not in protected]


def _last(scores: list[float], n_drop: int, protected: set[int], seed: int) -> list[int]:
    return _unprotected(len(scores), protected)[-n_drop:]


def _random(scores: list[float], n_drop: int, protected: set[int], seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(_unprotected(len(scores), protected), n_drop))


@dataclass(frozen=True)
class Baseline:
    """How a peer method scores blocks (`observer(num_blocks, n_drop)`, None if it needs no data)
    and chooses them; `score_kind` names the score in the plan."""

    score_kind: str
    observer: Callable[[int, int], BlockObserver] | None
    choose: Chooser


BASELINES = {
    "block-influence": Baseline(
        "block_influence", lambda num_blocks, _n_drop: BlockInfluence(num_blocks), _lowest_influence
    ),
    "angular": Baseline("angular_distance", AngularDistance, _closest_run),
    "last": Baseline("none", None, _last),
    "random": Baseline("none", None, _random),
}
