"""Data-parallel calibration under `accelerate launch` (or torchrun): each process measures its
share of the calibration batches, batch i going to process i % world_size, and the statistics'
sums are all-reduced, so every process ends with the single-process statistics (to float
rounding) and chooses the same blocks. The selection stage's scorers (calibration NLL, network
GradNorm) shard and reduce the same way, rather than repeating every forward on every process.

The setup is read from accelerate's `PartialState`, which joins the launched processes' group
(any backend: gloo on CPU, NCCL on GPUs); a plain single process needs nothing and communicates
nothing.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState

T = TypeVar("T")


def _state() -> PartialState:
    # on a machine without an accelerator the launched processes join over gloo on the CPU
    # (accelerate goes distributed there only when told it runs on the CPU)
    return PartialState(cpu=not torch.accelerator.is_available())


def world_size() -> int:
    return _state().num_processes


def rank() -> int:
    return _state().process_index


def is_main_process() -> bool:
    """Only the main process writes files and prints results."""
    return _state().is_main_process


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: those at positions i with i % world_size == rank."""
    state = _state()
    return list(items[state.process_index :: state.num_processes])


def process_device() -> torch.device | None:
    """Where this process's copy of the model belongs when several processes share a machine's
    accelerators (its own GPU), else None (load as usual)."""
    state = _state()
    return state.device if state.num_processes > 1 and state.device.type != "cpu" else None


def _comm_device(state: PartialState) -> torch.device:
    """NCCL reduces tensors on the process's GPU; the other backends on the CPU."""
    return state.device if dist.get_backend() == "nccl" else torch.device("cpu")


def from_main_process(tensor: torch.Tensor) -> torch.Tensor:
    """The main process's `tensor` (of the same shape and dtype everywhere) on every process;
    single process: `tensor` itself."""
    partial = _state()
    if partial.num_processes == 1:
        return tensor
    shared = tensor.to(_comm_device(partial), copy=True).contiguous()
    dist.broadcast(shared, src=0)
    return shared.to(tensor.device)


def all_reduce_state(state: dict[str, Any]) -> dict[str, Any]:
    """The sum over processes of each entry (tensors and numbers) of an accumulator's
    `state_dict()`; the given state is left unchanged. Single process: `state` itself."""
    partial = _state()
    if partial.num_processes == 1:
        return state
    device = _comm_device(partial)
    reduced = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            summed = value.detach().to(device, copy=True)
        elif isinstance(value, (int, float)):
            summed = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64, device=device)
        else:
            raise TypeError(f"Cannot sum {key!r} ({type(value).__name__}) over processes.")
        dist.all_reduce(summed)
        reduced[key] = summed.to(value.device) if isinstance(value, torch.Tensor) else summed.item()
    return reduced
