"""Analysis time of SGLP's default against SLEB, side by side in one process, on the quality
benchmark's models and calibration (benchmarks/quality.py), at the smallest drop count there:
the hardest case for the ratio, since SLEB's cost grows with every block it removes and the
default's mostly does not.

Each method runs `analyze` from scratch (no statistics shared), SGLP first, then SLEB, then SGLP
again; the SGLP time is the mean of its two runs, which bracket SLEB's in time, so a machine
that gets busier or quieter during the run does not favour one side. The blocks each chose
are recorded; quality.md has their held-out perplexity.

    python benchmarks/cost.py --models smollm2-135m
    OMP_NUM_THREADS=1 python benchmarks/cost.py --models gemma-3-270m

Results: benchmarks/results/cost-<model>.json, gathered into benchmarks/results/cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace
from pathlib import Path

import torch

from quality import CALIBRATION, MODELS, RATIOS, RESULTS
from sglp_llm.api import analyze
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.data import prepare_calibration
from sglp_llm.model.loading import load_model


def measure(name: str) -> dict:
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    num_blocks = len(find_decoder_blocks(model).layers)
    drop = replace(CALIBRATION, ratio=RATIOS[0], drop=None).resolve_drop(num_blocks)
    calibration = prepare_calibration(None, tokenizer, CALIBRATION)
    runs = []
    for method in ("sglp", "sleb", "sglp"):
        plan = analyze(model, calibration, replace(CALIBRATION, drop=drop, method=method), progress=True)
        runs.append({"method": method, "dropped": plan.dropped, "timings": plan.timings})
    sglp = [r["timings"]["total_s"] for r in runs if r["method"] == "sglp"]
    sleb = runs[1]["timings"]["total_s"]
    return {
        "model": loaded.name, "num_blocks": num_blocks, "drop": drop, "runs": runs,
        "sglp_s": sum(sglp) / 2, "sleb_s": sleb, "ratio": sleb / (sum(sglp) / 2),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }


def gather() -> Path:
    lines = [
        "# Analysis time: SGLP default vs SLEB, side by side (benchmarks/cost.py)", "",
        "| model | drop | SGLP default (s, mean of 2) | SLEB (s) | SLEB / SGLP | same blocks? | threads |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        path = RESULTS / f"cost-{name}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            same = r["runs"][0]["dropped"] == r["runs"][1]["dropped"]
            lines.append(
                f"| {r['model']} | {r['drop']} | {r['sglp_s']:.0f} | {r['sleb_s']:.0f} | {r['ratio']:.1f}x "
                f"| {'yes' if same else 'no'} ({r['runs'][0]['dropped']} vs {r['runs'][1]['dropped']}) | {r['threads']} |"
            )
    target = RESULTS / "cost.md"
    target.write_text("\n".join(lines) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    for name in args.models.split(","):
        result = measure(name)
        (RESULTS / f"cost-{name}.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {gather()}")


if __name__ == "__main__":
    main()
