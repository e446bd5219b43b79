"""Deciding among several choices on held-back calibration text (issue 23's ensemble candidate):
SGLP's choice competes with peers' (block influence, angular, ...), and the set whose removal
leaves the lowest calibration loss on every calibration token after the loss check's own wins.
Those tokens are read by no search, so a set that only fits the loss check's tokens loses there.
Measured in benchmarks/results/pool-decision.md."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import ConfigError
from ..data import first_tokens, skip_samples, token_count
from ..model.handle import ModelHandle
from .removal import calibration_nll

def held_back_rest(batches: Sequence[dict[str, torch.Tensor]], loss_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Every calibration sequence after the first ones holding `loss_tokens` tokens (the loss
    check's); refused when none is left."""
    searched = sum(len(b["input_ids"]) for b in first_tokens(batches, loss_tokens))
    rest = skip_samples(batches, searched)
    if not rest:
        raise ConfigError(
            f"decide_among compares the choices on the calibration tokens after the loss check's {loss_tokens}, "
            "but those take every calibration sequence; give more calibration text (--n-samples) or fewer --loss-tokens."
        )
    return rest


def decide(
    handle: ModelHandle, batches: Sequence[dict[str, torch.Tensor]], candidates: dict[str, Sequence[int]], loss_tokens: int,
) -> tuple[str, dict[str, Any]]:
    """The candidate (name -> dropped blocks) whose removal leaves the lowest calibration loss on
    the held-back sequences (ties: the one listed first), and the record of the decision: each
    candidate's blocks and loss, the winner and how many tokens decided."""
    held_back = held_back_rest(batches, loss_tokens)
    measured: dict[tuple[int, ...], float] = {}  # a set two candidates share is measured once
    for blocks in candidates.values():
        key = tuple(sorted(blocks))
        if key not in measured:
            measured[key] = calibration_nll(handle, held_back, key)
    losses = {name: measured[tuple(sorted(blocks))] for name, blocks in candidates.items()}
    order = list(candidates)
    winner = min(order, key=lambda name: (losses[name], order.index(name)))
    return winner, {
        "held_back_tokens": token_count(held_back),
        "candidates": {name: {"dropped": sorted(blocks), "held_back_loss": losses[name]} for name, blocks in candidates.items()},
        "chosen": winner,
    }
