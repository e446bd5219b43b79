"""Peer depth-pruning methods, run through SGLP's own pipeline (same calibration data, same hooked
forward pass, same rewrite and save), so a comparison differs only in how blocks are chosen:

- "block-influence": ShortGPT (Men et al. 2024, arXiv:2403.03853), drop the n blocks whose output
  is closest in angle to their input;
- "angular": Gromov et al. 2024 (arXiv:2403.17887), drop the contiguous run of n blocks whose
  input and output are closest in angle;
- "last": drop the n deepest unprotected blocks (with protect_last=1, the n before the final one);
- "random": drop n unprotected blocks drawn with random.Random(seed);
- "sleb": SLEB (Song et al. 2024, arXiv:2402.09025), remove blocks one at a time, each time the
  one whose removal leaves the lowest calibration loss (forward passes only).

Baselines do not segment: their plan has one segment holding every block. Each is a registered
selection (sglp_llm.selection.registry), like SGLP's own.
"""

from __future__ import annotations

import math
import time
import random
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .removal import removal_loss
from .select import choose_drops
from .registry import Selection, SelectionContext, Selector, register


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
        self._positions: torch.Tensor | None = None

    def start_batch(self, token_mask: torch.Tensor) -> None:
        self._positions = token_mask.reshape(-1).nonzero().squeeze(-1)

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        if self._positions is None:  # outside a batch, e.g. a block recomputed in a backward
            return
        # per-token cosines in float32 (BI is linear in them), summed in float64; under a device
        # map a block's input may still be on the previous block's device
        output = _rows(block_output, self._positions, torch.float32)
        cos = F.cosine_similarity(_rows(block_input, self._positions, torch.float32).to(output.device), output, dim=-1)
        self.cos_sum[index] += cos.double().sum().cpu()

    def finish_batch(self) -> None:
        self.n_tokens += len(self._positions)
        self._positions = None

    def compute(self) -> torch.Tensor:
        return 1.0 - self.cos_sum / self.n_tokens

    def state_dict(self) -> dict:
        return {"cos_sum": self.cos_sum.clone(), "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.cos_sum = state["cos_sum"].to(torch.float64)
        self.n_tokens = state["n_tokens"]


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
        self._last: torch.Tensor | None = None
        self._window: dict[int, torch.Tensor] = {}

    def start_batch(self, token_mask: torch.Tensor) -> None:
        mask = token_mask.bool()
        seq = mask.shape[1]
        last = seq - 1 - mask.flip(-1).int().argmax(-1)  # last non-padding position of each row
        rows = mask.any(-1)
        self._last = (torch.arange(mask.shape[0], device=mask.device) * seq + last)[rows]
        self._window = {}

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        if self._last is None:  # outside a batch, e.g. a block recomputed in a backward
            return
        # float64: arccos is ill-conditioned near cos = 1, where the deep blocks' distances lie
        if index < len(self.sums):
            self._window[index] = _rows(block_input, self._last, torch.float64)
        start = index + 1 - self.run_length
        if start >= 0:
            # under a device map the run's first and last blocks may sit on different devices
            output = _rows(block_output, self._last, torch.float64)
            cos = F.cosine_similarity(self._window.pop(start).to(output.device), output, dim=-1)
            self.sums[start] += (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).sum().cpu()

    def finish_batch(self) -> None:
        self.n_sequences += len(self._last)
        self._last = None

    def compute(self) -> torch.Tensor:
        """The distance of the run starting at each block; NaN where no run of n blocks starts."""
        distances = torch.full((self.num_blocks,), math.nan, dtype=torch.float64)
        distances[: len(self.sums)] = self.sums / self.n_sequences
        return distances

    def state_dict(self) -> dict:
        return {"sums": self.sums.clone(), "n_sequences": self.n_sequences}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(torch.float64)
        self.n_sequences = state["n_sequences"]


Chooser = Callable[[SelectionContext], Selection]
# choose(scores, n_drop, protected, seed) -> sorted original indices of the blocks to drop
ScoreChooser = Callable[[list[float], int, set[int], int], list[int]]


def _from_scores(choose: ScoreChooser, score_kind: str) -> Chooser:
    """A chooser that needs only the observer's scores, which the plan reports unchanged."""

    def chooser(context: SelectionContext) -> Selection:
        dropped = choose(context.scores, context.n_drop, context.protected, context.config.seed)
        return Selection(dropped, context.scores, score_kind)

    return chooser


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


def _sleb(context: SelectionContext) -> Selection:
    """SLEB's greedy elimination: at each step every remaining unprotected block is removed in
    turn (on top of those already gone) and the one leaving the lowest calibration NLL goes.

    The reference minimises the summed NLL of its equal-length calibration samples, i.e. the
    perplexity; the per-token mean here ranks candidates the same way and also weighs padded
    batches fairly. A tie goes to the shallower block, as the reference's strict `<` does. A
    block's score is the loss increase its removal caused at its step. Being greedy, the first
    n steps of a longer run are the run for n: steps are kept in the analysis cache, so a
    comparison over several drop counts pays once, and each plan reports the time of its steps.
    """
    config = context.config
    # SLEB's own measurement: every position, the whole head
    network = removal_loss(context.handle, context.batches[: config.sleb_batches], config.replace(loss_positions=1.0, loss_vocabulary=0))
    num_blocks = len(context.scores)
    key = ("sleb-steps", context.cache_key, config.sleb_batches, tuple(sorted(context.protected)))
    run = context.cache.setdefault(key, {"steps": [], "start": None})
    if run["start"] is None:
        started = time.perf_counter()
        run["start"] = {"loss": network.loss_without([]),
                        "seconds": time.perf_counter() - started}
    removed = [step["block"] for step in run["steps"]]
    candidates = [b for b in _unprotected(num_blocks, context.protected) if b not in removed]
    missing = max(context.n_drop - len(removed), 0)
    n_candidates = sum(len(candidates) - step for step in range(missing))
    with tqdm(total=n_candidates, desc="SLEB candidates", disable=not context.progress) as bar:
        for _ in range(missing):
            started = time.perf_counter()
            losses = {}
            for block in candidates:
                losses[block] = network.loss_without(removed + [block])
                bar.update()
            best = min(candidates, key=lambda b: (losses[b], b))
            removed.append(best)
            candidates.remove(best)
            run["steps"].append({"block": best, "loss": losses[best], "seconds": time.perf_counter() - started})
    steps = run["steps"][: context.n_drop]
    scores = [math.nan] * num_blocks
    previous = run["start"]["loss"]
    for step in steps:
        scores[step["block"]] = step["loss"] - previous
        previous = step["loss"]
    seconds = run["start"]["seconds"] + sum(step["seconds"] for step in steps)
    return Selection(
        sorted(step["block"] for step in steps),
        scores,
        "sleb_loss",
        {"sleb_steps": [{"block": s["block"], "loss": s["loss"]} for s in steps]},
        seconds=seconds,
    )


# the peers, registered as selections by method name
BASELINES = {
    "block-influence": Selector(
        lambda num_blocks, _n_drop: BlockInfluence(num_blocks), _from_scores(_lowest_influence, "block_influence")
    ),
    "angular": Selector(AngularDistance, _from_scores(_closest_run, "angular_distance")),
    "last": Selector(None, _from_scores(_last, "none")),
    "random": Selector(None, _from_scores(_random, "none")),
    "sleb": Selector(None, _sleb, ("sleb_batches",)),
}
for _name, _selector in BASELINES.items():
    register(_name, _selector)
