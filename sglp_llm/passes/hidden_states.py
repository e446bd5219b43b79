"""Where the sequential pass keeps every block's hidden states between its forward, the statistics
and the backward: in memory, or in a temporary folder on disk (one safetensors file per block,
removed when the pass ends) when they would not fit, since they are the calibration tokens times
the hidden size times the number of blocks: about 18 GB in bfloat16 for an 8B model calibrated on
64 × 1024 tokens, 43 GB for a 70B one. On disk, host memory holds one block's states for each
batch while the blocks run, and one batch's pair of states while the statistics read them back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

# "auto" spills when the states would take more than this share of the available memory
AUTO_SHARE = 0.5


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux /proc/meminfo), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def spills(mode: str, total_bytes: int) -> bool:
    """Whether states of `total_bytes` go to disk under `mode` (config.HIDDEN_STATES)."""
    if mode != "auto":
        return mode == "disk"
    available = available_memory()
    return available is not None and total_bytes > AUTO_SHARE * available


class BlockStates:
    """The hidden states of each block position (0: the first block's input, i + 1: block i's
    output) for each batch; on disk under `folder` (a new temporary folder inside it, or the
    system's temporary folder) when `on_disk`. Use as a context manager: the folder goes at exit."""

    def __init__(self, on_disk: bool, folder: str | Path | None = None) -> None:
        self.on_disk = on_disk
        self.folder = Path(tempfile.mkdtemp(prefix="sglp-hidden-states-", dir=folder)) if on_disk else None
        self._memory: dict[int, list[torch.Tensor]] = {}

    def __enter__(self) -> "BlockStates":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _file(self, position: int) -> Path:
        return self.folder / f"{position}.safetensors"

    def put(self, position: int, states: list[torch.Tensor]) -> None:
        if not self.on_disk:
            self._memory[position] = states
            return
        from safetensors.torch import save_file

        save_file({str(b): state.contiguous() for b, state in enumerate(states)}, self._file(position))

    def get(self, position: int, batch: int) -> torch.Tensor:
        if not self.on_disk:
            return self._memory[position][batch]
        from safetensors import safe_open

        with safe_open(self._file(position), framework="pt") as f:
            return f.get_tensor(str(batch))

    def drop(self, position: int) -> None:
        """Forget the states of `position` (no longer needed)."""
        self._memory.pop(position, None)
        if self.on_disk:
            self._file(position).unlink(missing_ok=True)
