"""Forward hooks that hand every decoder block's input and output to a callback.

Hidden states are never stored here: each callback folds them into running statistics (CKA,
block influence, ...) as the forward pass goes, and the hooks are removed even on error.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

BlockCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class BlockObserver(Protocol):
    """A streaming statistic over block inputs/outputs, so several share one forward pass:
    `start_batch(token_mask)`, then `on_block` for every block, then `finish_batch()`; at the end
    `compute()` gives the statistic."""

    def start_batch(self, token_mask: torch.Tensor) -> None: ...

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None: ...

    def finish_batch(self) -> None: ...

    def compute(self) -> torch.Tensor: ...


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def without_sequence_starts(token_mask: torch.Tensor) -> torch.Tensor:
    """`token_mask` less each row's first token (after any left padding): the attention sink,
    whose massive activations some statistics leave out."""
    token_mask = token_mask.clone()
    rows = token_mask.any(dim=1).nonzero().squeeze(-1)
    token_mask[rows, token_mask[rows].int().argmax(dim=1)] = False
    return token_mask


def token_mask(batch: dict[str, torch.Tensor], skip_first: bool = False) -> torch.Tensor:
    """Every non-padding token of `batch` (all tokens without an attention mask), less each
    row's first with `skip_first`."""
    mask = batch.get("attention_mask")
    mask = (mask if mask is not None else torch.ones_like(batch["input_ids"])).bool()
    return without_sequence_starts(mask) if skip_first else mask


def block_output(output) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers v5) or a tuple whose first item it is."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture_blocks(layers: Sequence[nn.Module], callback: BlockCallback) -> Iterator[None]:
    """Call `callback(index, block_input, block_output)` after every block's forward."""

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            callback(index, block_input(args, kwargs), block_output(output))

        return hook

    handles = [
        layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised once the blocks a forward pass was run for are done: nothing after them is needed."""
