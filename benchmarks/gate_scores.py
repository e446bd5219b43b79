"""Which gradient score predicts what removing a block costs? (issue 15, item 2)

On a packaged real model, one backward over the calibration batches gives three per-block scores
(sglp_llm.statistics.score): the paper's GradNorm (norm of the block's weight gradients), the gate's Taylor
estimate −dL/dα and the gate's second moment E[(dL/dα)²]; ShortGPT's block influence (forward
only) is shown beside them. Each is rank-correlated (Spearman) with the true cost of removing
that block alone: the calibration loss without it, and the held-out loss without it (log
perplexity on the built-in evaluation paragraphs, another source). Blocks are the unprotected ones (not the first or
last). Writes benchmarks/results/gate-scores-<model>.md and .json.

    python benchmarks/gate_scores.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from sglp_llm.api import collect_block_statistics
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.data import STDLIB_DOCS, prepare_calibration
from sglp_llm.config import SGLPConfig
from sglp_llm.evaluation.evaluate import load_eval_texts, perplexity
from sglp_llm.model.loading import load_model
from sglp_llm.selection.removal import calibration_nll
from sglp_llm.model.rewrite import skip_blocks

RESULTS = Path(__file__).resolve().parent / "results"
# the quality benchmark's calibration (benchmarks/quality.py)
CALIBRATION = dict(dataset=STDLIB_DOCS, seq_len=256, n_samples=16, batch_size=4, seed=0, verify=False)
SCORES = ("gradnorm", "taylor", "fisher", "block_influence")


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the ranks (ties get their mean rank)."""

    def ranks(values: list[float]) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-max-texts", type=int, default=20, help="evaluation paragraphs scored per removed block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    blocks = find_decoder_blocks(model)
    num_blocks = len(blocks.layers)
    candidates = list(range(1, num_blocks - 1))

    timings = {}
    measured = {}
    for name, settings in (
        ("forward only (CKA, block influence)", dict(method="block-influence")),
        ("gate backward (taylor, fisher)", dict(gradient_score="taylor", scoring="block")),
        ("weight-gradient backward (gradnorm + gates)", dict(gradient_score="gradnorm", scoring="block")),
    ):
        config = SGLPConfig(drop=1, **CALIBRATION, **settings)
        calibration = prepare_calibration(None, tokenizer, config)
        stats = collect_block_statistics(model, calibration, config, 1, progress=False)
        timings[name] = stats.seconds
        measured.update(stats.gradient_scores)
        if config.method == "block-influence":
            measured["block_influence"] = stats.scores.tolist()
    batches = calibration.batches

    started = time.perf_counter()
    base_loss = calibration_nll(model, batches, [])
    calibration_loss = {b: calibration_nll(model, batches, [b]) for b in candidates}
    timings["true removal loss, every block (calibration)"] = time.perf_counter() - started
    texts, eval_description = load_eval_texts(None, max_texts=args.eval_max_texts)

    def held_out() -> float:
        return math.log(perplexity(model, tokenizer, texts, max_length=256, batch_size=8, progress=False)["perplexity"])

    base_held_out = held_out()
    held_out_loss = {}
    for b in candidates:
        with skip_blocks(model, [b]):
            held_out_loss[b] = held_out()

    truths = {"calibration loss without the block": calibration_loss, "held-out loss without the block": held_out_loss}
    table = {
        score: {truth: spearman([measured[score][b] for b in candidates], [loss[b] for b in candidates])
                for truth, loss in truths.items()}
        for score in SCORES
    }
    result = {
        "model": loaded.name, "blocks": num_blocks, "candidates": candidates,
        "calibration": f"{CALIBRATION['n_samples']} x {CALIBRATION['seq_len']} tokens of {STDLIB_DOCS}",
        "held_out": eval_description, "base_calibration_loss": base_loss, "base_held_out_loss": base_held_out,
        "scores": {s: measured[s] for s in SCORES}, "calibration_loss": calibration_loss,
        "held_out_loss": held_out_loss, "spearman": table, "seconds": timings, "threads": args.threads,
    }
    out = RESULTS / f"gate-scores-{args.model}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Gradient scores against the true cost of removing one block: {loaded.name}",
        "",
        f"Calibration: {result['calibration']}. Held-out: {eval_description}, windows of 256 tokens. "
        f"Blocks {candidates[0]}-{candidates[-1]} (the unprotected ones). Made by `benchmarks/gate_scores.py`, "
        f"{args.threads} torch thread(s).",
        "",
        "Spearman rank correlation of each score (low = cheap to drop) with the loss after removing "
        "that block alone (higher is better; 1 = the score orders blocks exactly by their cost):",
        "",
        "| score | " + " | ".join(truths) + " |",
        "|---|" + "---|" * len(truths),
    ]
    for score in SCORES:
        lines.append(f"| {score} | " + " | ".join(f"{table[score][t]:+.2f}" for t in truths) + " |")
    lines += ["", "Time of each pass over the calibration batches (s):", ""]
    lines += [f"- {name}: {seconds:.1f}" for name, seconds in timings.items()]
    lines += ["", "| block | " + " | ".join(SCORES) + " | calibration loss without | held-out loss without |",
              "|---" * (len(SCORES) + 3) + "|"]
    for b in candidates:
        lines.append(f"| {b} | " + " | ".join(f"{measured[s][b]:.4g}" for s in SCORES)
                     + f" | {calibration_loss[b]:.4f} | {held_out_loss[b]:.4f} |")
    lines.append(f"\nUnpruned: calibration loss {base_loss:.4f}, held-out loss {base_held_out:.4f}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(SCORES)]))


if __name__ == "__main__":
    main()
