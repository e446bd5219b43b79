"""The workload of tests/test_distributed.py: run once as a plain single process and once under
`accelerate launch --num_processes 2 --cpu`, whose plans must match. Several methods, so every
reduced sum is exercised: CKA (all), GradNorm, the loss check's calibration NLL (with and
without a GradNorm shortlist), the subset
search's network GradNorm, a baseline observer, the sequential (one block at a time) pass, and the
model's own samples as calibration (drawn once, by the main process);
the compensation's Gram sums and cosine gradients; then the CLI, which must write one report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sglp_llm import SGLPConfig, analyze
from sglp_llm.cli import main as cli_main
from sglp_llm.recovery.compensate import fit_compensation
from sglp_llm.passes.distributed import is_main_process
from tiny_models import tiny_batch, tiny_model, tiny_tokenizer

# three batches: two processes get an uneven share (batches 0 and 2, and batch 1)
SETTINGS = {
    "sglp-loss": dict(scoring="loss", loss_tokens=96, loss_candidates=2),
    "sglp-loss-all": dict(scoring="loss", loss_tokens=96),  # the default: no GradNorm
    # screened on the first sequence: in batch 0, which only one of the two processes holds
    "sglp-loss-screen": dict(scoring="loss", loss_tokens=96, loss_screen_samples=1, loss_bound="local"),
    "sglp-subset": dict(scoring="subset", subset_batches=3, max_candidates=3),
    "block-influence": dict(method="block-influence"),
    "sglp-sequential": dict(offload="sequential", scoring="block"),
}

COMPENSATIONS = {
    "least_squares": {}, "run-by-run": dict(fit_on="pruned"), "cosine": dict(method="cosine", cosine_steps=5),
    "rescale": dict(method="rescale"),
}


def run(model_dir: Path, text_file: Path, out: Path) -> None:
    model = tiny_model("llama", num_layers=6)
    batches = [tiny_batch(batch_size=2, seq_len=16, seed=s) for s in range(3)]
    plans = {}
    compensations = {}
    for name, settings in COMPENSATIONS.items():
        fitted = fit_compensation(model, batches, [2, 4], **settings)
        compensations[name] = {str(p): t.tolist() for p, t in fitted.transforms.items()}
    for name, settings in SETTINGS.items():
        config = SGLPConfig(drop=2, groups=True, num_segments=2, cka_minibatch_tokens=8, **settings)
        plan = analyze(model, batches, config, progress=False)
        plans[name] = {k: getattr(plan, k) for k in ("cka", "scores", "dropped", "n_tokens", "n_batches", "extra")}
    # the model's own samples (the default calibration): every process calibrates on the main
    # process's draws, even where its own would differ (as another GPU's rounding might): the
    # other process draws with another seed here
    seed = torch.manual_seed
    if not is_main_process():
        torch.manual_seed = lambda s: seed(s + 1)
    plan = analyze(model, None, SGLPConfig(drop=2, n_samples=6, seq_len=16, batch_size=2, cka_minibatch_tokens=8,
                                           stability_check=False), tokenizer=tiny_tokenizer(), progress=False)
    torch.manual_seed = seed
    plans["self-generated"] = {k: getattr(plan, k) for k in ("cka", "scores", "dropped", "n_tokens", "n_batches", "extra")}
    cli_main([
        "analyze", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), "--seq-len", "16",
        "--n-samples", "6", "--batch-size", "2", "--cka-minibatch-tokens", "8", "--no-progress",
        "--report", str(out / "report.json"),
    ])
    if is_main_process():
        (out / "plans.json").write_text(json.dumps({"plans": plans, "compensations": compensations}))


if __name__ == "__main__":
    run(*(Path(arg) for arg in sys.argv[1:]))
