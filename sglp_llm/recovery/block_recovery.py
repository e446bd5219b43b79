"""Block-local recovery: after a removal, the kept block that feeds each gap is trained to
reproduce what the original network held at the far side of the gap.

In the pruned network a kept block k hands its output to the next kept block n, which the
original network fed with the state after block n − 1. So k is trained (all its weights, nothing
folded, so any family's norms and gates are fine) to map the input the pruned network gives it
to the original's state after block n − 1, on the calibration tokens. The blocks trained: each
kept block followed by a removed run, and the first kept block when the removal starts at block
0 (its input is the embedding, where the original had the state after the removed run). The
loss is each token's squared error relative to its target's squared norm, averaged over tokens,
so the attention sink's huge state (which the next norm divides away) does not outweigh the rest.

The walk goes block by block over every calibration batch with two streams, the original's and
the pruned network's (trained blocks in place as it goes: later blocks learn from the inputs the
recovered network gives them), so only one block is on the execution device at a time: it runs
under sequential onloading, and with blocks on disk the trained weights are written to a scratch
checkpoint that the model then reads them from (and is saved from). Memory: the block, its AdamW
state, and four hidden states per batch. Under `accelerate launch` each process runs its share
of the batches and the gradients are averaged, so every process trains the same weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..model.handle import ModelHandle
from ..passes.capture import block_output, token_mask
from ..passes.distributed import all_reduce_state, shard, world_size
from ..passes.sequential import _BlockCall, _record_calls
from ..model.offload import SafetensorsBlocks, onloaded

# gradients are clipped to this norm: one odd batch must not undo a block's training
MAX_GRAD_NORM = 1.0
# the error before and after training is measured on this many batches (per process)
ERROR_BATCHES = 8


@dataclass
class BlockRecovery:
    """What was trained: for each trained block (original index), the removed blocks it now
    stands in for, the state it is trained towards and its error before and after (on the first
    `ERROR_BATCHES` batches)."""

    steps: int
    learning_rate: float
    trained: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        """Put the trained blocks' old weights back (newest first)."""
        while self._undo:
            self._undo.pop()()

    def record(self) -> dict[str, Any]:
        """The part that goes into the plan's report (JSON)."""
        return {"method": "blocks", "steps": self.steps, "learning_rate": self.learning_rate,
                "trained": {str(k): v for k, v in self.trained.items()}, "seconds": self.seconds}


def trained_blocks(num_blocks: int, dropped: Sequence[int]) -> dict[int, int]:
    """Kept block k -> the original block after which its target state is taken (n − 1 for the
    next kept block n, the last block when none is kept after k), for the blocks this trains."""
    removed = set(dropped)
    kept = [i for i in range(num_blocks) if i not in removed]
    if not kept:
        raise ValueError("Every block is removed; nothing is left to recover with.")
    following = {k: n for k, n in zip(kept, kept[1:] + [num_blocks])}
    return {k: n - 1 for k, n in following.items() if n != k + 1 or (k == kept[0] and k > 0)}


def token_relative_error(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens in `mask` of ‖output − target‖² / ‖target‖²."""
    output, target = output[mask].float(), target[mask].float().to(output.device)
    return (((output - target) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-12)).mean()


def _average_gradients(parameters: Sequence[nn.Parameter]) -> None:
    if world_size() == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def _mean_error(block: nn.Module, calls, inputs, targets, masks) -> float:
    """The loss over the first `ERROR_BATCHES` batches of every process (all of them would cost
    as much again as the training)."""
    n = min(ERROR_BATCHES, len(calls))
    with torch.no_grad():
        total = sum(float(token_relative_error(block_output(c.run(block, x)), t, m))
                    for c, x, t, m in zip(calls[:n], inputs[:n], targets[:n], masks[:n]))
    summed = all_reduce_state({"total": total, "batches": n})
    return summed["total"] / max(summed["batches"], 1)


def _train_block(
    block: nn.Module, calls: Sequence[_BlockCall], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor], steps: int, learning_rate: float, bar: tqdm,
) -> tuple[float, float]:
    """Train every floating-point weight of `block` in float32 for `steps` AdamW steps, one
    batch per step in turn; (error before, error after)."""
    parameters = [p for p in block.parameters() if p.is_floating_point()]
    saved = [(p.dtype, p.requires_grad) for p in parameters]
    try:
        for p in parameters:
            p.data = p.data.float()
            p.requires_grad_(True)
        before = _mean_error(block, calls, inputs, targets, masks)
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
        with torch.enable_grad():
            for step in range(steps):
                j = step % len(calls)
                loss = token_relative_error(block_output(calls[j].run(block, inputs[j].float())), targets[j], masks[j])
                loss.backward()
                _average_gradients(parameters)
                torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
        after = _mean_error(block, calls, inputs, targets, masks)
    finally:
        for p, (dtype, flag) in zip(parameters, saved):
            p.requires_grad_(flag)
            p.data = p.data.to(dtype)
    return before, after


def _kept_in_memory(recovery: BlockRecovery, block: nn.Module) -> None:
    """Remember `block`'s weights so that `recovery.restore()` puts them back."""
    state = {name: t.detach().cpu().clone() for name, t in block.state_dict().items()}
    recovery._undo.append(lambda: block.load_state_dict(state))


def recover_blocks(
    model: nn.Module | ModelHandle,
    batches: Sequence[dict[str, torch.Tensor]],
    dropped: Sequence[int],
    *,
    steps: int,
    learning_rate: float,
    progress: bool = True,
) -> BlockRecovery:
    """Train, in place, the kept blocks that feed each gap left by removing `dropped` (original
    block indices; the model still has every block), each for `steps` steps over `batches`.
    The blocks run one at a time as the handle runs them (sequential onloading, blocks on disk:
    on its onload device; else each where it is). `BlockRecovery.restore` undoes it."""
    handle = ModelHandle.of(model)
    layers = handle.layers
    target_after = trained_blocks(len(layers), dropped)
    recovery = BlockRecovery(steps, learning_rate)
    if not target_after:
        return recovery
    removed = set(dropped)
    first_kept = min(i for i in range(len(layers)) if i not in removed)
    trained_at = {after: k for k, after in target_after.items()}
    batches = shard(batches)
    device, loader = handle.block_device, handle.block_loader
    started = time.perf_counter()
    with torch.no_grad():
        recorded = [_record_calls(handle, batch) for batch in batches]
    calls = [c for _, c in recorded]
    masks = [token_mask(batch).to(device) for batch in batches]
    original = [first.to(device) for first, _ in recorded]
    pruned = list(original)  # the same tensors until the streams part
    inputs: dict[int, list[torch.Tensor]] = {}
    bar = tqdm(total=steps * len(target_after), desc="Recovering blocks", disable=not progress)
    try:
        for index in range(max(target_after.values()) + 1):
            block = layers[index]
            with onloaded(loader, index, block, device), torch.no_grad():
                for j, batch_calls in enumerate(calls):
                    if index in target_after:
                        inputs.setdefault(index, []).append(pruned[j])
                    same = pruned[j] is original[j]
                    original[j] = block_output(batch_calls[index].run(block, original[j]))
                    if index not in removed and index not in target_after:
                        pruned[j] = original[j] if same else block_output(batch_calls[index].run(block, pruned[j]))
            if index not in trained_at:
                continue
            k = trained_at[index]  # trained to give the original's state after this block
            own = [batch_calls[k] for batch_calls in calls]
            with onloaded(loader, k, layers[k], device):
                if not isinstance(loader, SafetensorsBlocks):
                    _kept_in_memory(recovery, layers[k])
                before, after = _train_block(layers[k], own, inputs[k], original, masks, steps, learning_rate, bar)
                with torch.no_grad():
                    pruned = [block_output(c.run(layers[k], x)) for c, x in zip(own, inputs.pop(k))]
                if isinstance(loader, SafetensorsBlocks):
                    recovery._undo.append(loader.replace_block(k, layers[k]))
            start = 0 if k == first_kept else k + 1
            recovery.trained[k] = {
                "stands_in_for": [b for b in range(start, index + 1) if b in removed],
                "target": f"the original's state after block {index}",
                "relative_error_before": before, "relative_error_after": after,
            }
    except BaseException:
        recovery.restore()
        raise
    finally:
        bar.close()
    recovery.seconds = time.perf_counter() - started
    return recovery
