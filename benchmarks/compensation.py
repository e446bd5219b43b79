"""Does least-squares compensation (ReplaceMe) help on held-out text? (issue 17, a first measurement)

For the blocks that the default, SLEB and block influence drop at about 20 % and 30 % (read from
benchmarks/results/ablation-<model>.json, the same calibration), fit T on the calibration text
(16 x 256 tokens of the standard-library docstrings, seed 0), fold it, and score held-out
perplexity on fortunes (50 texts) and the shipped paragraphs, against the same blocks dropped
plainly. Variants: each sequence's first token in or out of the fit; a ridge chosen on a held-back
quarter of the calibration sequences (never the held-out text).

    python benchmarks/compensation.py --models smollm2-135m

Results: benchmarks/results/compensation.json and compensation.md.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from quality import CALIBRATION, RESULTS
from sglp_llm.compensate import fit_compensation, fold
from sglp_llm.config import ConfigError
from sglp_llm.data import FORTUNES, prepare_calibration
from sglp_llm.evaluate import load_eval_texts, perplexity
from sglp_llm.loading import load_model
from sglp_llm.removal import calibration_nll
from sglp_llm.rewrite import skip_blocks

SELECTIONS = ("default", "sleb", "block-influence")
RIDGES = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


def _held_out(model, tokenizer, texts, dropped):
    with skip_blocks(model, dropped):
        return {name: perplexity(model, tokenizer, t, max_length=256, batch_size=8, progress=False)["perplexity"]
                for name, t in texts.items()}


def _rows(batches):
    return [{k: v[i : i + 1] for k, v in batch.items()} for batch in batches for i in range(len(batch["input_ids"]))]


def _ridge_on_held_back(model, rows, dropped, skip_first):
    """The ridge whose T, fitted on the first three quarters of the calibration sequences, gives
    the lowest calibration loss on the last quarter."""
    cut = len(rows) * 3 // 4
    losses = {}
    for ridge in RIDGES:
        folded = copy.deepcopy(model)
        fold(folded, fit_compensation(model, rows[:cut], dropped, skip_first=skip_first, ridge=ridge))
        losses[ridge] = calibration_nll(folded, rows[cut:], dropped)
        del folded
    return min(losses, key=losses.get), losses


def run_model(name: str) -> dict:
    ablation = json.loads((RESULTS / f"ablation-{name}.json").read_text())
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = _rows(prepare_calibration(None, tokenizer, CALIBRATION).batches)
    texts = {"fortunes": load_eval_texts(FORTUNES, max_texts=50)[0], "paragraphs": load_eval_texts(None)[0]}
    drops = ablation["drops"][1:]  # about 20 % and 30 %
    out = {"model": loaded.name, "drops": drops, "cells": []}
    for drop in drops:
        for selection in SELECTIONS:
            dropped = ablation["runs"][f"{selection}|{drop}"]["dropped"]
            cell = {"selection": selection, "drop": drop, "dropped": dropped,
                    "plain": ablation["evaluated"][",".join(map(str, sorted(dropped)))]}
            try:
                for label, skip_first in (("least_squares", False), ("least_squares, sink out", True)):
                    compensation = fit_compensation(model, rows, dropped, skip_first=skip_first)
                    folded = copy.deepcopy(model)
                    fold(folded, compensation)
                    cell[label] = _held_out(folded, tokenizer, texts, dropped)
                    cell[label]["relative_residual"] = {str(p): f["relative_residual"] for p, f in compensation.fits.items()}
                    del folded
                ridge, losses = _ridge_on_held_back(model, rows, dropped, skip_first=True)
                compensation = fit_compensation(model, rows, dropped, skip_first=True, ridge=ridge)
                folded = copy.deepcopy(model)
                fold(folded, compensation)
                cell["least_squares, sink out, ridge"] = {**_held_out(folded, tokenizer, texts, dropped), "ridge": ridge,
                                                          "held_back_losses": {str(k): v for k, v in losses.items()}}
                del folded
            except ConfigError as error:
                cell["refused"] = str(error)
            out["cells"].append(cell)
            print(json.dumps(cell), flush=True)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# Least-squares compensation on held-out text (benchmarks/compensation.py)", "",
             "Perplexity fortunes / paragraphs; the same blocks dropped plainly and with T folded in. "
             "Calibration 16 x 256 docstring tokens, seed 0.", ""]
    variants = ("least_squares", "least_squares, sink out", "least_squares, sink out, ridge")
    for result in results:
        lines += [f"## {result['model']}", "", "| selection | drop | blocks | plain | " + " | ".join(variants) + " |",
                  "|---" * (4 + len(variants)) + "|"]
        for cell in result["cells"]:
            def text(v):
                return f"{v['fortunes']:.1f} / {v['paragraphs']:.1f}"
            if "refused" in cell:
                rest = [cell["refused"]] + [""] * (len(variants) - 1)
            else:
                rest = [text(cell[v]) + (f" (ridge {cell[v]['ridge']:g})" if "ridge" in cell[v] else "") for v in variants]
            lines.append(f"| {cell['selection']} | {cell['drop']} | {' '.join(map(str, cell['dropped']))} | "
                         f"{text(cell['plain'])} | " + " | ".join(rest) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_model(name) for name in args.models.split(",")]
    (RESULTS / "compensation.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "compensation.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
