"""Does compensation-aware selection choose other blocks, and better ones? (issue 17, item 3)

The default loss check at the largest benchmarked drop (about 30 %), once plain and once with
`compensation_aware` (each candidate removal measured with its compensation fitted on the loss
tokens and applied; no screen). The greedy search removes one block at a time, so its first n
removals are its choice at drop n: each drop count of benchmarks/results/ablation-<model>.json is
read off one run. Where the aware choice differs, its held-out perplexity with the compensation
folded in is measured, to set beside the plain choice compensated (benchmarks/compensation.py)
and dropped plainly. Calibration: 16 x 256 docstring tokens, seed 0, as everywhere.

    python benchmarks/compensation_aware.py --models smollm2-135m --compensations rescale --threads 1

Results: benchmarks/results/compensation-aware.json (resumable), shown in compensation.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compensation import _held_out, _key, _rows
from quality import CALIBRATION, MODELS, RESULTS
from sglp_llm import analyze
from sglp_llm.recovery.compensate import fit_compensation, fold
from sglp_llm.data import FORTUNES, prepare_calibration
from sglp_llm.evaluation.evaluate import load_eval_texts
from sglp_llm.model.loading import load_model

OUTPUT = RESULTS / "compensation-aware.json"


def run(name: str, compensation: str, results: dict) -> None:
    ablation = json.loads((RESULTS / f"ablation-{name}.json").read_text())
    drops = ablation["drops"]
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = prepare_calibration(None, tokenizer, CALIBRATION)
    settings = CALIBRATION.replace(drop=max(drops), compensation=compensation, compensation_aware=True)
    started = time.perf_counter()
    plan = analyze(model, calibration, settings, tokenizer=tokenizer, progress=True)
    order = [step["block"] for step in plan.extra["loss_check"]["steps"]]
    entry = {"model": loaded.name, "compensation": compensation, "order": order,
             "analysis_s": time.perf_counter() - started, "drops": {}}
    texts = {"fortunes": load_eval_texts(FORTUNES, max_texts=50)[0], "paragraphs": load_eval_texts(None)[0]}
    rows = _rows(calibration.batches)
    for drop in drops:
        aware = sorted(order[:drop])
        plain = ablation["runs"][f"default|{drop}"]["dropped"]
        cell = {"aware": aware, "plain_choice": plain, "differs": aware != sorted(plain)}
        if cell["differs"]:
            unfold = fold(model, fit_compensation(model, rows, aware, method=compensation))
            try:
                cell["compensated"] = _held_out(model, tokenizer, texts, aware)
            finally:
                unfold()
            cell["plain"] = ablation["evaluated"].get(_key(aware)) or _held_out(model, tokenizer, texts, aware)
        entry["drops"][str(drop)] = cell
        print(json.dumps({name: {drop: cell}}), flush=True)
    results[f"{name}|{compensation}"] = entry
    OUTPUT.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--compensations", default="rescale")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(OUTPUT.read_text()) if OUTPUT.is_file() else {}
    for name in args.models.split(","):
        for compensation in args.compensations.split(","):
            if f"{name}|{compensation}" not in results:
                run(name, compensation, results)


if __name__ == "__main__":
    main()
