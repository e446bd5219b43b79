"""The workload of tests/test_distributed.py's healing test: distillation healing of a tiny pruned
llama at a global batch of 4 windows, run once as one process (4 per step) and once under
`accelerate launch` as 2 processes (2 per process); the adapters and each step's loss must match."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sglp_llm.passes.distributed import is_main_process, world_size
from sglp_llm.heal import HealConfig, heal
from sglp_llm.model.rewrite import removing_blocks
from tiny_models import tiny_model, tiny_tokenizer


def run(out: Path) -> None:
    teacher = tiny_model("llama", num_layers=6)
    student = tiny_model("llama", num_layers=6)
    removing_blocks(student, [2, 3])
    config = HealConfig(steps=4, seq_len=16, batch_size=4 // world_size(), learning_rate=3e-3, eval_max_texts=1,
                        dropout=0.0, hidden_weight=0.5)
    healed = heal(student, tiny_tokenizer(), config, teacher=teacher, teacher_tokenizer=tiny_tokenizer(), progress=False)
    if is_main_process():
        adapter = {k: v.detach().contiguous() for k, v in healed.model.state_dict().items() if "lora" in k}
        save_file(adapter, str(out / "adapter.safetensors"))
        (out / "losses.txt").write_text(" ".join(map(repr, healed.report["loss"]["per_step"])) + f"\n{healed.report['tokens']}\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]))
