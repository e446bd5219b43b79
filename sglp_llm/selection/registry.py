"""The one interface every way of choosing blocks implements, and the registry of them by name.

A selection reads the statistics of the one hooked pass (CKA, the per-block scores its observer
or the gradient pass measured) from a `SelectionContext`, may run the model on the calibration
batches (SLEB, SGLP's loss check and subset search), and returns a `Selection`: the blocks to
drop, the per-block scores the plan reports and what else it measured. SGLP's selections
(sglp_llm.selection.sglp) first split the blocks into Fisher groups; the peers
(sglp_llm.selection.baselines) treat the whole stack as one group. `settings` lists the SGLPConfig fields a
selection reads, so a user knows which settings matter for the method they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..model.handle import ModelHandle
from ..passes.capture import BlockObserver
from ..passes.original_outputs import OriginalOutputs
from ..config import SGLPConfig


@dataclass(frozen=True)
class SelectionContext:
    """What a selection may use: the statistics of the one observer pass and, for selections that
    score candidate networks, the model's handle and the calibration batches (on its input device)."""

    handle: ModelHandle
    batches: list[dict[str, torch.Tensor]]
    cka: torch.Tensor
    scores: list[float]  # the pass's per-block scores (a gradient score or a peer's); NaN where none
    n_drop: int
    protected: set[int]
    config: SGLPConfig
    progress: bool
    # analyze's statistics cache and this analysis' key in it: a selection may keep work there
    # that another analysis of the same statistics can reuse (SLEB's greedy steps)
    cache: dict = field(default_factory=dict)
    cache_key: tuple = ()
    # the original network's block outputs on the loss check's batches, kept by the statistics pass
    original_outputs: OriginalOutputs | None = None
    # the selection's own observer's per-block scores (a peer's; the loss check's block influence)
    observed: list[float] | None = None


@dataclass
class Selection:
    """The blocks to drop (sorted original indices), the per-block scores the plan reports and
    what they are (`score_kind`), the groups the choice was made in (None: the whole stack as one)
    with the drops each gave, and what else was measured (merged into the plan's `extra`)."""

    dropped: list[int]
    scores: list[float]
    score_kind: str
    extra: dict[str, Any] = field(default_factory=dict)
    segments: list[list[int]] | None = None
    drops: list[int] | None = None
    segmentation_losses: list[float] = field(default_factory=list)
    # time spent before the choice proper (e.g. {"segmentation_s": ...}), reported apart
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None  # the selection's cost, when part of it was done earlier


@dataclass(frozen=True)
class Selector:
    """A registered selection: the observer its statistics pass feeds (`observer(num_blocks,
    n_drop)`, None if it needs none beyond CKA and the gradient pass), its `choose`, and the
    SGLPConfig fields it reads besides the calibration and protection settings."""

    observer: Callable[[int, int], BlockObserver] | None
    choose: Callable[[SelectionContext], Selection]
    settings: tuple[str, ...] = ()


SELECTIONS: dict[str, Selector] = {}


def register(name: str, selector: Selector) -> Selector:
    if name in SELECTIONS:
        raise ValueError(f"A selection named {name!r} is already registered.")
    SELECTIONS[name] = selector
    return selector


def selection_name(config: SGLPConfig) -> str:
    """The registered selection a config runs: a peer by its method name, SGLP by its scoring."""
    return config.method if config.method != "sglp" else f"sglp-{config.scoring}"


def selector_for(config: SGLPConfig) -> Selector:
    """The registered chooser (the package's `__init__` imports every module that registers one)."""
    return SELECTIONS[selection_name(config)]
