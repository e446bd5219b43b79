"""Forward hooks that hand every decoder block's input and output to a callback, and stubs that
stand in for the blocks in a recording forward.

Hidden states are never stored here: each callback folds them into running statistics (CKA,
block influence, ...) as the forward pass goes, and the hooks are removed even on error.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from ..model.blocks import UnsupportedModelError

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


def block_arity(output) -> int:
    """How many items a decoder block returns: 0 for a bare tensor, else its tuple's length (the
    hidden states first, then what the family adds: attention weights, a cache, ...)."""
    return len(output) if isinstance(output, (tuple, list)) else 0


def as_returned(hidden: torch.Tensor, arity: int) -> Any:
    """What a stand-in for a block returning `arity` items gives back: `hidden`, in a tuple
    of that length with None for the rest where the block returns a tuple (a family whose loop
    unpacks a fixed count, as CPM-Ant's and RWKV's do, takes it; one that reads the rest finds
    none, as with `output_attentions` off)."""
    return (hidden, *([None] * (arity - 1))) if arity else hidden


def refuse_carried_state(model: nn.Module, output: Any) -> None:
    """Refuse a family whose decoder block `output` holds, beside the hidden states, a state the
    model hands to the next block (HY-V4's top-k indices): a pass-through stand-in cannot give it, and a model
    without the block would not have it, so no removal could be measured or checked. Called where
    the model was shown to use it (its loss changes without it, `output.verify`; the next block's
    call holds it, `passes.sequential`) or choked on a stand-in without it."""
    extra = extra_items(output)
    if extra:
        raise UnsupportedModelError(
            f"This {type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}) cannot be "
            f"depth-pruned: each of its decoder blocks returns, beside the hidden states, a state of its own "
            f"({', '.join(extra)}) that the model hands to the next block (as a recurrent state). sglp-llm measures a removal by "
            "letting the hidden states pass the block by, and writes a model without it; both need blocks "
            "whose other outputs the model does not pass on, so no choice or rewrite could be checked for this family."
        )


def extra_items(output: Any) -> list[str]:
    """The type names of what a block returns beside the hidden states (None items left out)."""
    return [type(item).__name__ for item in output[1:] if item is not None] if isinstance(output, (tuple, list)) else []


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


class _Stub(nn.Module):
    """Stands in for a decoder block in a recording or loss forward. The block is held outside
    the module tree (its parameters are not the stub's); attributes the model's loop reads from
    its blocks (e.g. `attention_type`) come from it."""

    def __init__(self, block: nn.Module, on_call: Callable[[tuple, dict], Any]) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "on_call", on_call)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.on_call(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)


@contextmanager
def stubbed_blocks(layers: nn.ModuleList, on_call: Callable[[int, nn.Module, tuple, dict], Any]) -> Iterator[None]:
    """Replace every block by a stub calling `on_call(index, block, args, kwargs)` (the block
    may be called from there, or not); always restored."""
    originals = list(layers)
    try:
        for index, block in enumerate(originals):
            layers[index] = _Stub(block, lambda args, kwargs, index=index, block=block: on_call(index, block, args, kwargs))
        yield
    finally:
        for index, block in enumerate(originals):
            layers[index] = block
