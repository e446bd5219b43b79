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
# label -> (method, whether the ridge is chosen on held-back calibration sequences)
VARIANTS = {"least_squares": ("least_squares", False), "least_squares, ridge": ("least_squares", True),
            "rescale": ("rescale", False)}


def _held_out(model, tokenizer, texts, dropped):
    with skip_blocks(model, dropped):
        return {name: perplexity(model, tokenizer, t, max_length=256, batch_size=8, progress=False)["perplexity"]
                for name, t in texts.items()}


def _rows(batches):
    return [{k: v[i : i + 1] for k, v in batch.items()} for batch in batches for i in range(len(batch["input_ids"]))]


def _ridge_on_held_back(model, rows, dropped, method):
    """The ridge whose T, fitted on the first three quarters of the calibration sequences, gives
    the lowest calibration loss on the last quarter."""
    cut = len(rows) * 3 // 4
    losses = {}
    for ridge in RIDGES:
        folded = copy.deepcopy(model)
        fold(folded, fit_compensation(model, rows[:cut], dropped, method=method, ridge=ridge))
        losses[ridge] = calibration_nll(folded, rows[cut:], dropped)
        del folded
    return min(losses, key=losses.get), losses


def _compensated(model, tokenizer, texts, rows, dropped, method, choose_ridge):
    """Held-out perplexity with T fitted on all calibration sequences (first tokens left out)."""
    ridge, losses = _ridge_on_held_back(model, rows, dropped, method) if choose_ridge else (0.0, None)
    compensation = fit_compensation(model, rows, dropped, method=method, ridge=ridge)
    folded = copy.deepcopy(model)
    fold(folded, compensation)
    result = {**_held_out(folded, tokenizer, texts, dropped), "ridge": ridge,
              "relative_residual": {str(p): f["relative_residual"] for p, f in compensation.fits.items()}}
    if losses is not None:
        result["held_back_losses"] = {str(k): v for k, v in losses.items()}
    return result


def run_model(name: str) -> dict:
    ablation = json.loads((RESULTS / f"ablation-{name}.json").read_text())
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = _rows(prepare_calibration(None, tokenizer, CALIBRATION).batches)
    texts = {"fortunes": load_eval_texts(FORTUNES, max_texts=50)[0], "paragraphs": load_eval_texts(None)[0]}
    drops = ablation["drops"][1:]  # about 20 % and 30 %
    out = {"model": loaded.name, "drops": drops, "cells": []}
    measured: dict[str, dict] = {}  # dropped blocks -> the variants' results (selections often agree)
    for drop in drops:
        for selection in SELECTIONS:
            dropped = ablation["runs"][f"{selection}|{drop}"]["dropped"]
            key = ",".join(map(str, sorted(dropped)))
            if key not in measured:
                measured[key] = {}
                for label, (method, choose_ridge) in VARIANTS.items():
                    try:
                        measured[key][label] = _compensated(model, tokenizer, texts, rows, dropped, method, choose_ridge)
                    except ConfigError as error:
                        measured[key][label] = {"refused": str(error)}
            cell = {"selection": selection, "drop": drop, "dropped": dropped, "plain": ablation["evaluated"][key],
                    **measured[key]}
            out["cells"].append(cell)
            print(json.dumps(cell), flush=True)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# Compensation on held-out text (benchmarks/compensation.py)", "",
             "Perplexity fortunes / paragraphs of the same blocks dropped plainly and with T folded in "
             "(each sequence's first token left out of the fit; the ridge, where chosen, on the last "
             "quarter of the calibration sequences). Calibration 16 x 256 docstring tokens, seed 0; "
             "blocks from benchmarks/results/ablation-<model>.json. Bold: at least 15 % below plain on both.", ""]
    for result in results:
        lines += [f"## {result['model']}", "", "| selection | drop | blocks | plain | " + " | ".join(VARIANTS) + " |",
                  "|---" * (4 + len(VARIANTS)) + "|"]
        for cell in result["cells"]:
            plain = cell["plain"]

            def text(v):
                if "refused" in v:
                    return "refused (post-feedforward norm)"
                body = f"{v['fortunes']:.1f} / {v['paragraphs']:.1f}" + (f" (ridge {v['ridge']:g})" if v["ridge"] else "")
                better = all(v[k] <= 0.85 * plain[k] for k in ("fortunes", "paragraphs"))
                return f"**{body}**" if better else body

            lines.append(f"| {cell['selection']} | {cell['drop']} | {' '.join(map(str, cell['dropped']))} | "
                         f"{plain['fortunes']:.1f} / {plain['paragraphs']:.1f} | "
                         + " | ".join(text(cell[v]) for v in VARIANTS) + " |")
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
