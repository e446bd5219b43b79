"""Resumable statistics passes: the sums of every accumulator (CKA, GradNorm, a baseline's
observer) and the number of calibration batches done are saved every few batches, so a long pass
on a big model that is interrupted goes on from its last save instead of from the start.

The accumulators' states are plain sums and the CKA token draws depend only on each batch's
index, so a resumed pass ends with exactly the statistics of an uninterrupted one. A checkpoint
is written atomically (temporary file, then rename) and carries a fingerprint of what was
measured (statistics settings, calibration tokens, model shape and dtype): a checkpoint of another
run is refused rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

from ..config import ConfigError
from ..data import hash_batches
from ..model.handle import ModelHandle

FORMAT = 1


class Accumulator(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def fingerprint(key: tuple, batches: Sequence[dict[str, torch.Tensor]], handle: ModelHandle) -> str:
    """What the statistics depend on, hashed: the statistics key, every calibration token, and
    the model's class, block count, size and dtype (not its weights: hashing them costs a pass)."""
    digest = hashlib.sha256(repr((FORMAT, key)).encode())
    hash_batches(digest, batches)
    model, layers = handle.model, handle.layers
    params = list(model.parameters())
    dtypes = sorted({str(p.dtype) for layer in layers for p in layer.parameters()})
    digest.update(repr((type(model).__name__, len(layers), sum(p.numel() for p in params), dtypes)).encode())
    return digest.hexdigest()


class StatisticsCheckpoint:
    """One file per statistics key in `directory` (so the passes of a comparison, or of runs with
    other settings, keep separate files), holding the summed states and how many batches they
    cover."""

    def __init__(self, directory: str | os.PathLike, key: tuple, fingerprint: str) -> None:
        settings = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
        self.path = Path(directory) / f"statistics-{key[0]}-{settings}.pt"
        self.fingerprint = fingerprint

    def resume(self, accumulators: Mapping[str, Accumulator], *, load_sums: bool = True) -> int:
        """The number of batches already measured (0 without a checkpoint); their sums are loaded
        into `accumulators` if `load_sums` (under data parallelism, by the main process only, as
        the other processes' sums are added to it)."""
        if not self.path.is_file():
            return 0
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"The checkpoint {str(self.path)!r} was written by another run (a different model "
                "or other calibration text under the same settings), so it cannot be resumed here. "
                "Give this run another --checkpoint-dir, or delete the file to start over."
            )
        if load_sums:
            for name, accumulator in accumulators.items():
                accumulator.load_state_dict(saved["state"][name])
        return saved["batches_done"]

    def save(self, batches_done: int, state: dict[str, Any]) -> None:
        """Write the summed `state` (name -> state_dict) covering the first `batches_done` batches."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        payload = {"fingerprint": self.fingerprint, "batches_done": batches_done, "state": state}
        try:
            torch.save(payload, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
