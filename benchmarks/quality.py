"""Held-out quality of every method on real pretrained models, offline.

SmolLM2-135M (30 blocks) and Gemma-3-270M (18 blocks), both packaged on PyPI; calibration on the
Python standard-library docstrings, held-out perplexity on Debian's fortunes (a different
source); about 10 %, 20 % and 30 % of the blocks dropped; every baseline, SGLP's default and the
SGLP variants (scoring mode, segmentation feature, auto-k rule, allocation).

    python benchmarks/quality.py                  # both models (hours on 2 CPU cores)
    python benchmarks/quality.py --models smollm2-135m
    python benchmarks/quality.py --models gemma-3-270m --variants sglp-paper

Each model's comparison is saved after every measurement and resumed on the next start, so an
interrupted run loses at most one cell. Results: benchmarks/results/quality-<model>/compare.*,
and benchmarks/results/quality.md gathers the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

from sglp_llm.compare import Comparison, compare
from sglp_llm.config import SGLPConfig
from sglp_llm.data import FORTUNES, STDLIB_DOCS
from sglp_llm.evaluation.evaluate import perplexity
from sglp_llm.model.loading import load_model
from sglp_llm.model.rewrite import skip_blocks

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("smollm2-135m", "gemma-3-270m")
RATIOS = (0.1, 0.2, 0.3)
# cheapest first, SLEB (drop x blocks forward passes) last
METHODS = ("block-influence", "angular", "last", "random", "sglp", "sleb")
# The paper's literal choice (the default until this benchmark picked the loss check); every
# variant names all the settings it changes from the current defaults (scoring "loss", allocation
# "auto" = by loss, every block of a segment a candidate, lazy re-measurement, 2 batches, auto_k
# "elbow", the first step screened on 1 sequence, the local bound).
PAPER = {"scoring": "block", "segment_feature": "column_sum", "auto_k": "reference", "allocation": "size"}
# the loss check before screening and the local bound: every candidate of the first step
# measured on the batch, the earlier loss as the lazy bound
UNSCREENED = {"loss_screen_samples": 0, "loss_bound": "stale", "loss_tokens": 1024}
# the loss check as first measured: every candidate measured at every step, the 5 % rule
LOSS_FULL = {**UNSCREENED, "scoring": "loss", "loss_lazy": False, "allocation": "size", "auto_k": "reference"}
LOSS2 = {**LOSS_FULL, "loss_candidates": 2}
VARIANTS = {
    "sglp-paper": PAPER,
    "sglp-rows": {**PAPER, "segment_feature": "rows"},
    "sglp-elbow": {**PAPER, "auto_k": "elbow"},
    "sglp-loss": LOSS2,
    "sglp-loss-elbow": {**LOSS2, "auto_k": "elbow"},
    "sglp-loss-rows-elbow": {**LOSS2, "segment_feature": "rows", "auto_k": "elbow"},
    "sglp-loss-redundancy": {**LOSS2, "allocation": "redundancy"},
    # the default until the loss-allocation runs: 4 candidates per segment, drops by size
    "sglp-loss-c4": {**LOSS_FULL, "loss_candidates": 4, "allocation": "size"},
    "sglp-loss-b4": {**LOSS_FULL, "loss_candidates": 4, "allocation": "size", "loss_tokens": 4096},
    "sglp-loss-free": {**LOSS_FULL, "loss_candidates": 4, "allocation": "loss"},
    # the default with the loss measured on one batch, not two
    "sglp-batch1": {"loss_tokens": 1024},
    # the default before screening and the local bound (one batch)
    "sglp-stale": UNSCREENED,
    # the default before that: the 8 lowest-GradNorm blocks of a segment are the candidates
    "sglp-gradnorm8": {**UNSCREENED, "loss_candidates": 8},
    # that with the paper's 5 % rule instead of the elbow
    "sglp-reference": {**UNSCREENED, "loss_candidates": 8, "auto_k": "reference"},
    "sglp-lazy-free": {**UNSCREENED, "scoring": "loss", "loss_lazy": True, "loss_candidates": 4, "allocation": "loss",
                       "auto_k": "reference"},
    # the lazy bound that assumes a block's damage never shrinks as others go, for every candidate
    "sglp-marginal": {**UNSCREENED, "loss_bound": "marginal"},
    # the paper's search: forward+backward per candidate keep-set, the slowest SGLP variant
    "sglp-subset": {"scoring": "subset"},
    # the default's loss check within fixed drops per segment: by size, by redundancy
    "sglp-size": {"allocation": "size"},
    "sglp-redundancy": {"allocation": "redundancy"},
    # the default with a fixed number of segments, and with segments of at least 3 blocks
    "sglp-k4": {"num_segments": 4},
    "sglp-min3": {"min_segment_size": 3},
    # the same three on the paper's literal choice, where drops per segment follow the segments
    "sglp-paper-redundancy": {**PAPER, "allocation": "redundancy"},
    "sglp-paper-k4": {**PAPER, "num_segments": 4},
    "sglp-paper-min3": {**PAPER, "min_segment_size": 3},
}
# every variant was measured with the Fisher groups, the default until benchmarks/ablation.py
# showed they change no choice of the loss check
VARIANTS = {name: {"groups": True, **settings} for name, settings in VARIANTS.items()}
# the head over the whole vocabulary (the default) unless a run says otherwise
CALIBRATION = SGLPConfig(drop=1, dataset=STDLIB_DOCS, seq_len=256, n_samples=16, batch_size=4, seed=0, loss_vocabulary=0)


def held_out_evaluator(model, tokenizer, texts: dict[str, tuple[list[str], str]], evaluated: dict) -> Callable[[list[int]], dict[str, float]]:
    """dropped blocks -> the held-out perplexity on each of `texts` (name -> (texts, description))
    with those blocks skipped; runs that drop the same blocks share one evaluation, kept in
    `evaluated` (saved with the results, so restarts keep it too)."""

    def held_out(dropped: list[int]) -> dict[str, float]:
        key = ",".join(map(str, sorted(dropped)))
        if key not in evaluated:
            with skip_blocks(model, dropped):
                evaluated[key] = {
                    name: perplexity(model, tokenizer, t, max_length=256, batch_size=8, progress=False)["perplexity"]
                    for name, (t, _) in texts.items()
                }
        return evaluated[key]

    return held_out


def gather_results(kind: str, title: str, markdown: Callable[[dict], str], variants: tuple[str, ...] = ("",)) -> Path:
    """benchmarks/results/<kind>.md: `title`, then `markdown` of each model's <kind>-<variant><model>.json,
    variant by variant."""
    parts = [f"# {title}", ""]
    for variant in variants:
        for name in MODELS:
            path = RESULTS / f"{kind}-{variant}{name}.json"
            if path.is_file():
                parts.append(markdown(json.loads(path.read_text())))
    target = RESULTS / f"{kind}.md"
    target.write_text("\n".join(parts))
    print(f"wrote {target}")
    return target


def measure_models(doc: str, measure: Callable[[str], dict], kind: str, title: str, markdown: Callable[[dict], str]) -> None:
    """The command line of a benchmark run model by model: --models and --threads, `measure`
    each model, then gather <kind>.md."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        measure(name)
    gather_results(kind, title, markdown)


def run_model(name: str, eval_max_texts: int, methods: list[str], variants: list[str]) -> Comparison:
    out = RESULTS / f"quality-{name}"
    resume = Comparison.load(out) if (out / "compare.json").is_file() else None
    loaded = load_model(name, dtype="float32")
    return compare(
        loaded.model, loaded.tokenizer, CALIBRATION,
        ratios=RATIOS, methods=methods, variants={v: VARIANTS[v] for v in variants},
        eval_source=FORTUNES, eval_max_texts=eval_max_texts, eval_max_length=256, eval_batch_size=8,
        model_name=loaded.name, resume=resume, on_result=lambda c: c.save(out),
    ).save(out)


def gather(models: list[str]) -> Path:
    """benchmarks/results/quality.md: each model's perplexity and analysis-time tables."""
    parts = ["# Held-out quality by method (benchmarks/quality.py)", ""]
    for name in models:
        path = RESULTS / f"quality-{name}"
        if (path / "compare.json").is_file():
            comparison = Comparison.load(path)
            parts += [comparison.markdown().replace("# Depth-pruning comparison", "## Model"), ""]
    compensation = RESULTS / "compensation.md"  # benchmarks/compensation.py: the same blocks, compensated
    if compensation.is_file():
        parts += [compensation.read_text().replace("\n#", "\n##").replace("# Compensation", "## Compensation", 1), ""]
    target = RESULTS / "quality.md"
    target.write_text("\n".join(parts))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--eval-max-texts", type=int, default=150)
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to run, in this order")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="SGLP variants to run besides the default")
    args = parser.parse_args()
    models = args.models.split(",")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    for name in models:
        run_model(name, args.eval_max_texts, args.methods.split(","), variants)
        print(f"wrote {gather(models)}")


if __name__ == "__main__":
    main()
