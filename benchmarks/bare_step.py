"""A whole `sglp-llm analyze` of SmolLM2-135M against a bare training step on the same tokens
(issue 26): each a process of its own, from start to exit, alternated, best of `--repeats`.

The analysis: `sglp-llm analyze --drop 6 --n-samples 64 --seq-len 128 --dataset builtin:stdlib-docs` (the defaults otherwise:
the loss check, the stability check, the preflight check). The bare step: a script that loads the
model the same way, builds the same calibration windows and runs one forward and backward over
all of them (every parameter collecting gradients). Both at `--threads` torch threads.

    python benchmarks/bare_step.py --threads 2

Results: benchmarks/results/bare-step.json and bare-step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# the docstrings named: the default calibration samples the model's own text first, which the bare
# step would not (issue 26 measures the analysis of the same docstring tokens)
SETTINGS = ["--drop", "6", "--n-samples", "64", "--seq-len", "128", "--dataset", "builtin:stdlib-docs"]


def bare_step() -> None:
    """The child: load, tokenize, one forward and backward over every calibration window."""
    import torch

    from sglp_llm.config import SGLPConfig
    from sglp_llm.data import prepare_calibration
    from sglp_llm.model.loading import load_model
    from sglp_llm.passes.loss import causal_lm_loss

    loaded = load_model(None)  # as `sglp-llm analyze` loads it: the checkpoint's dtype
    config = SGLPConfig(drop=6, n_samples=64, seq_len=128)
    calibration = prepare_calibration(None, loaded.tokenizer, config)
    for batch in calibration.batches:
        causal_lm_loss(loaded.model, batch).backward()
    torch.cuda.synchronize() if torch.cuda.is_available() else None


def _timed(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--role", choices=["bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "bare":
        bare_step()
        return
    analyze = [sys.executable, "-m", "sglp_llm.cli", "analyze", *SETTINGS, "--no-progress"]
    bare = [sys.executable, __file__, "--role", "bare"]
    times: dict[str, list[float]] = {"analyze": [], "bare": []}
    for _ in range(args.repeats):
        times["analyze"].append(_timed(analyze, args.threads))
        times["bare"].append(_timed(bare, args.threads))
    ratio = min(times["analyze"]) / min(times["bare"])
    result = {"settings": SETTINGS, "threads": args.threads, "seconds": times, "ratio": ratio}
    (RESULTS / "bare-step.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bare-step.md").write_text(
        "# `sglp-llm analyze` against a bare training step (benchmarks/bare_step.py)\n\n"
        f"SmolLM2-135M, `sglp-llm analyze {' '.join(SETTINGS)}` against loading the model and one forward and "
        f"backward over the same windows, each a process, alternated, {args.threads} torch threads:\n\n"
        "| | seconds (each run) | best |\n|---|---|---|\n"
        + "".join(f"| {k} | {', '.join(f'{t:.1f}' for t in v)} | {min(v):.1f} |\n" for k, v in times.items())
        + f"\nratio (best over best): **{ratio:.2f}**\n")
    print(f"analyze / bare step: {ratio:.2f}")


if __name__ == "__main__":
    main()
