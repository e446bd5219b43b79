"""The workload of tests/test_distributed.py's recovery test: block-local recovery of a tiny
llama, run once as one process (batches of 4 windows) and once under `accelerate launch
--num_processes 2 --cpu` (the same windows as batches of 2, one to each process per step, the
gradients averaged); the trained weights must match."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sglp_llm.recovery.block_recovery import recover_blocks
from sglp_llm.passes.distributed import is_main_process, world_size
from tiny_models import tiny_batch, tiny_model


def run(out: Path) -> None:
    model = tiny_model("llama", num_layers=6)
    halves = [tiny_batch(batch_size=2, seq_len=16, seed=s) for s in range(8)]
    if world_size() == 1:  # step s reads windows 2s and 2s + 1, as the two processes do together
        batches = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(halves[::2], halves[1::2])]
    else:
        batches = halves
    recovery = recover_blocks(model, batches, [2, 3], steps=4, learning_rate=3e-3, progress=False)
    if is_main_process():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        (out / "recovery.json").write_text(json.dumps(recovery.trained))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]))
