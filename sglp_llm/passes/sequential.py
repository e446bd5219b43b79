"""Sequential onloading: the plain pass's statistics (CKA, per-block GradNorm, the baselines'
observer scores) with only one decoder block on the execution device at a time, for models larger
than that device's memory, or than RAM when the blocks are read from disk (`load_with_blocks_on_disk`).

A block's call arguments other than its hidden-state input (attention masks, which differ per
block in sliding/full attention models, position embeddings, position ids, ...) do not depend on
the hidden states. So one forward with every block replaced by a stub records them, and the blocks
can then run one at a time: each is onloaded, run on every batch's stored input, and offloaded,
with the hidden states kept in CPU memory between blocks. The observers then see the blocks batch
by batch in the plain pass's order, so even the CKA minibatch draws are the same. For GradNorm the
model's own head (final norm, lm_head, softcapping, loss) runs on the stored final hidden state,
and the gradient goes down block by block, each block's forward recomputed with grad.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.handle import ModelHandle
from ..model.offload import onloaded
from .capture import BlockObserver, StopForward, as_returned, block_arity, block_input, block_output, refuse_carried_state, stubbed_blocks
from .head import head_gradient
from .hidden_states import BlockStates, spills
from .loss import causal_lm_loss, grad_only_for

if TYPE_CHECKING:  # the runner only calls them; the statistics layer defines them
    from ..statistics.score import BlockGradNorms, GateScores

def _move(value: Any, device: torch.device, moved: dict[int, Any]) -> Any:
    """`value` with its tensors on `device`; a tensor shared by several calls is moved once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = value.to(device)
        return moved[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, moved) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, moved) for k, v in value.items()}
    return value


@dataclass
class _BlockCall:
    """One block's call in the model's forward, less its hidden-state input."""

    args: tuple
    kwargs: dict
    positional: bool  # whether the hidden states came as the first positional argument

    @classmethod
    def record(cls, args: tuple, kwargs: dict) -> "_BlockCall":
        if args:
            return cls(args[1:], kwargs, True)
        return cls((), {k: v for k, v in kwargs.items() if k != "hidden_states"}, False)

    def on(self, device: torch.device, moved: dict[int, Any]) -> "_BlockCall":
        """This call with its tensors on `device` (`moved`: tensors already moved, shared by calls)."""
        return _BlockCall(_move(self.args, device, moved), _move(self.kwargs, device, moved), self.positional)

    def run(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.positional:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, hidden_states=hidden, **self.kwargs)


def _record_calls(handle: ModelHandle, batch: dict[str, torch.Tensor], arity: int = 0,
                  first_output: Any = None) -> tuple[torch.Tensor, list[_BlockCall]]:
    """The first block's hidden-state input (the embedding output) and every block's call, its
    tensors on the device the blocks run on. The stand-ins return `as_returned(input, arity)`
    (the first one `first_output` when given); a model that chokes on that is recorded again with
    the first block's own output as its stand-in's and the others shaped alike."""
    model, layers = handle.model, handle.layers
    calls: list[tuple[int, tuple, dict]] = []

    def record(index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        calls.append((index, args, kwargs))
        if index == len(layers) - 1:
            raise StopForward
        return first_output if index == 0 and first_output is not None else as_returned(block_input(args, kwargs), arity)

    failure: Exception | None = None
    with torch.no_grad(), stubbed_blocks(layers, record):
        try:
            causal_lm_loss(model, batch)
        except StopForward:
            pass
        except Exception as error:
            failure = error
    if failure is not None:
        if calls and first_output is None:  # the model choked on a stand-in's output: try one shaped as its blocks'
            output = _first_block_output(handle, calls[0])
            if block_arity(output) != arity:
                return _record_calls(handle, batch, block_arity(output), output)
            refuse_carried_state(handle.model, output)
        raise failure
    if first_output is not None and len(calls) > 1 and _hands_on(first_output, calls[1]):
        refuse_carried_state(handle.model, first_output)
    order = [index for index, _, _ in calls]
    if order != list(range(len(layers))):
        raise RuntimeError(
            f"Sequential offloading needs a model that calls each decoder block once, in order; "
            f"this {type(model).__name__} called them in the order {order}."
        )
    moved: dict[int, Any] = {}
    first = block_input(calls[0][1], calls[0][2]).detach().cpu()
    device = handle.block_device
    return first, [_BlockCall.record(args, kwargs).on(device, moved) for _, args, kwargs in calls]


def _hands_on(output: Any, call: tuple[int, tuple, dict]) -> bool:
    """Whether the model hands any of what a block returned beside its hidden states (`output`)
    to the next block's `call` (HY-V4's top-k indices): then no stand-in can give it. Attention
    weights that BLOOM's blocks return unasked go nowhere."""
    extras = [item for item in output[1:] if item is not None]
    _, args, kwargs = call

    def holds(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return any(holds(v) for v in value)
        if isinstance(value, dict):
            return any(holds(v) for v in value.values())
        # the object itself, or a tensor equal to one (a copy, a detached view)
        return any(value is item or (torch.is_tensor(value) and torch.is_tensor(item) and value.shape == item.shape
                                     and value.dtype == item.dtype and torch.equal(value.cpu(), item.cpu())) for item in extras)

    return holds(args[1:]) or holds({k: v for k, v in kwargs.items() if k != "hidden_states"})


def _first_block_output(handle: ModelHandle, call: tuple[int, tuple, dict]) -> Any:
    """The first block's own output on its recorded call: what stand-ins must look like."""
    _, args, kwargs = call
    alone = handle.one_block_at_a_time(handle.block_device)
    block, device = alone.layers[0], alone.onload_device
    with torch.no_grad(), onloaded(alone.loader, 0, block, device):
        return _BlockCall.record(args, kwargs).on(device, {}).run(block, block_input(args, kwargs).to(device))


@torch.no_grad()
def final_hidden_states(
    model: nn.Module | ModelHandle, batches: Sequence[dict[str, torch.Tensor]], *,
    progress: bool = True, desc: str = "Sequential forward",
) -> tuple[list[torch.Tensor], int]:
    """The last block's output for every batch (on the CPU) with one block at a time on the
    handle's onload device, and how many items the blocks return (for `head.final_hidden_state`).
    Memory: one hidden state per batch."""
    handle = ModelHandle.of(model).one_block_at_a_time()
    layers, device, loader = handle.layers, handle.onload_device, handle.loader
    recorded = [_record_calls(handle, batch) for batch in batches]
    hidden = [first for first, _ in recorded]
    arity = 0
    for index in tqdm(range(len(layers)), desc=desc, disable=not progress):
        block = layers[index]
        with onloaded(loader, index, block, device):
            for b, (_, calls) in enumerate(recorded):
                output = calls[index].run(block, hidden[b].to(device))
                arity = block_arity(output)
                hidden[b] = block_output(output).cpu()
    return hidden, arity


def _final_hidden_gradient(
    handle: ModelHandle, batch: dict[str, torch.Tensor], final: torch.Tensor, arity: int
) -> torch.Tensor:
    """d loss / d final hidden state, the loss computed by the model's own code (final norm,
    lm_head, logit softcapping, loss): the last stub returns the stored final hidden state."""
    return head_gradient(handle, batch, final, arity)[1].cpu()


def sequential_pass(
    model: nn.Module | ModelHandle,
    batches: Sequence[dict[str, torch.Tensor]],
    observers: Sequence[BlockObserver],
    grads: BlockGradNorms | None = None,
    gates: GateScores | None = None,
    *,
    hidden_states: str = "auto",
    hidden_states_dir: str | Path | None = None,
    progress: bool = True,
) -> int:
    """Feed `observers` and, if given, the gate scores `gates` (the backward runs for them) and
    every block's GradNorm `grads` (one group per block, needs `gates`) exactly as the plain hooked
    pass does, holding one block at a time on the handle's onload device, brought there by its
    loader (a model given as a module: its input device, blocks moved there and back, or read
    by its own loader, see `load_with_blocks_on_disk`). Every block's states are kept in memory
    or on disk under `hidden_states_dir` (sglp_llm.passes.hidden_states: "auto" spills them when
    they would not fit). Run in eval mode (analyze does). Returns how many items the blocks return (`capture.block_arity`).
    """
    if grads is not None and gates is None:
        raise ValueError("GradNorm is gathered in the gate scores' backward: pass `gates` with `grads`.")
    handle = ModelHandle.of(model).one_block_at_a_time()
    model, layers, device, loader = handle.model, handle.layers, handle.onload_device, handle.loader
    num_blocks = len(layers)
    batches = [{k: v.to(handle.input_device) for k, v in b.items()} for b in batches]
    firsts: list[torch.Tensor] = []
    calls: list[list[_BlockCall]] = []
    for batch in batches:
        first, batch_calls = _record_calls(handle, batch)
        firsts.append(first)
        calls.append(batch_calls)
    total_bytes = (num_blocks + 1) * sum(first.numel() * first.element_size() for first in firsts)
    with BlockStates(spills(hidden_states, total_bytes), hidden_states_dir) as states:
        states.put(0, firsts)
        current, arity = firsts, 0
        with torch.no_grad():
            for index in tqdm(range(num_blocks), desc="SGLP sequential forward", disable=not progress):
                block = layers[index]
                with onloaded(loader, index, block, device):
                    outputs = []
                    for b, state in enumerate(current):
                        output = calls[b][index].run(block, state.to(device))
                        arity = block_arity(output)
                        outputs.append(block_output(output).cpu())
                states.put(index + 1, outputs)
                current = outputs
        del current, outputs

        # an observer that keeps states on the host (`on_host`) gets them as stored: no copy
        on_host = [observer for observer in observers if getattr(observer, "on_host", False)]
        for b, batch in enumerate(batches):
            for observer in observers:
                observer.start_batch(batch["attention_mask"].bool())
            block_in = states.get(0, b).to(device)
            for index in range(num_blocks):
                stored = states.get(index + 1, b)
                block_out = stored.to(device)
                for observer in observers:
                    observer.on_block(index, block_in, stored if observer in on_host else block_out)
                block_in = block_out
            for observer in observers:
                observer.finish_batch()

        if gates is not None:
            with grad_only_for(model, ()):
                _backward(handle, batches, states, calls, gates, grads, arity, progress)
    return arity


def _backward(
    handle: ModelHandle,
    batches: list[dict[str, torch.Tensor]],
    states: BlockStates,
    calls: list[list[_BlockCall]],
    gates: GateScores,
    grads: BlockGradNorms | None,
    arity: int,
    progress: bool,
) -> None:
    """Backpropagate each batch's loss block by block (last first), pairing the gradient of each
    block's output with the block's Δ for the gate scores and, with `grads`, folding its parameter
    gradients into its GradNorm; only one block's parameters ever get gradients."""
    layers, device, loader = handle.layers, handle.onload_device, handle.loader
    num_blocks = len(layers)
    upstream = [
        _final_hidden_gradient(handle, batch, states.get(num_blocks, b).to(device), arity)
        for b, batch in enumerate(batches)
    ]
    blocks_down = tqdm(reversed(range(num_blocks)), total=num_blocks, desc="SGLP sequential backward", disable=not progress)
    predicted = [gates.start_batch(batch["attention_mask"].bool()) for batch in batches]
    for index in blocks_down:
        for b in range(len(batches)):
            gates.on_gradient(index, states.get(index + 1, b) - states.get(index, b), upstream[b], predicted[b])
        states.drop(index + 1)  # this block's output is no longer needed
        # the first block runs again only for its weight gradients: its input needs none
        if index > 0 or grads is not None:
            block = layers[index]
            weights = block.parameters() if grads is not None else ()
            with onloaded(loader, index, block, device), grad_only_for(block, weights):
                scorer = grads.for_one_block(block, gates.device) if grads is not None else None
                with scorer.hooks() if scorer is not None else nullcontext():
                    for b in range(len(batches)):
                        block_in = states.get(index, b).to(device).detach().requires_grad_(index > 0)
                        output = block_output(calls[b][index].run(block, block_in))
                        output.backward(upstream[b].to(output.device))
                        if index > 0:
                            upstream[b] = block_in.grad.cpu()
                if scorer is not None:
                    grads.squared[index] += scorer.squared[0]
    if grads is not None:
        for _ in batches:
            grads.end_batch()
    gates.check_finite()
