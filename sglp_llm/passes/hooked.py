"""The plain statistics pass: the whole model (in memory, or spread by a device map) runs its own
forward on each batch, hooks on the decoder blocks feed the observers, and for a gradient score
one backward per batch from the chunked head (sglp_llm.passes.head) gives the gate scores and, with
`grads`, every block's GradNorm. sglp_llm.passes.sequential is the same pass one block at a time;
a run's handle says which of the two it takes."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..model.handle import ModelHandle
from .capture import BlockObserver, capture_blocks
from .head import backward_through_head, output_of
from .loss import activation_checkpointing, grad_only_for

if TYPE_CHECKING:  # the runner only calls them; the statistics layer defines them
    from ..statistics.score import BlockGradNorms, GateScores


def hooked_pass(
    handle: ModelHandle,
    batches: Sequence[dict[str, torch.Tensor]],
    observers: Sequence[BlockObserver],
    grads: BlockGradNorms | None = None,
    gates: GateScores | None = None,
    *,
    gradient_checkpointing: bool = False,
    after_batch: Callable[[int], None] | None = None,
    progress: bool = True,
) -> int:
    """Feed `observers` every block's input and output on each batch and, with `gates`, run the
    backward for the gate scores (and `grads`' GradNorm); `gradient_checkpointing` recomputes the
    blocks' activations in it. `after_batch(k)` runs after the k-th batch (a checkpoint of the sums
    so far). Run in eval mode (analyze does). Returns how many items the blocks return (`capture.block_arity`)."""
    if grads is not None and gates is None:
        raise ValueError("GradNorm is gathered in the gate scores' backward: pass `gates` with `grads`.")
    model, layers, device = handle.model, handle.layers, handle.input_device
    arity = 0

    def feed(index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        for observer in observers:
            observer.on_block(index, block_input, block_output)

    with ExitStack() as stack:
        stack.enter_context(capture_blocks(layers, feed))
        if gates is None:  # no loss needed: the forward stops after the last block
            stack.enter_context(torch.no_grad())
        else:
            stack.enter_context(grad_only_for(model, grads.parameters() if grads is not None else ()))
            stack.enter_context(gates.hooks(layers))
            if grads is not None:
                stack.enter_context(grads.hooks())
            if gradient_checkpointing:
                stack.enter_context(activation_checkpointing(handle))
        for done, batch in enumerate(tqdm(batches, desc="SGLP calibration", disable=not progress), 1):
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch["attention_mask"].bool()
            for observer in observers:
                observer.start_batch(mask)
            if gates is not None:
                gates.start_batch(mask)
            final, arity = output_of(model, layers[-1], batch)
            for observer in observers:
                observer.finish_batch()
            if gates is not None:
                backward_through_head(handle, batch, final, arity)
            if grads is not None:
                grads.end_batch()
            if gates is not None:
                gates.check_finite()
            if after_batch is not None:
                after_batch(done)
    return arity
