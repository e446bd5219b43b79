"""What each SGLP stage buys: the default against itself with one stage taken out, the paper's
literal choice and the peers, on two held-out sources (issue 15, item 3).

Calibration as in benchmarks/quality.py (16 x 256 tokens of the standard-library docstrings,
seed 0); about 10/20/30 % of the blocks dropped; held-out perplexity on Debian's fortunes and on
the built-in evaluation paragraphs (sglp_llm/evaluation/tasks/sglp_local_ppl.jsonl), neither of them the
calibration source; analysis time of each plan. SGLP runs share one statistics pass per setting
(the reported time includes it), as `compare` does.

SLEB costs about drop x blocks forward passes (20-40 minutes per model here); with
`--sleb-from-quality` its chosen blocks and time are read from benchmarks/results/quality-<model>
(the same calibration, so the same greedy choices) instead of being measured again.

    python benchmarks/ablation.py --models smollm2-135m --sleb-from-quality

Results: benchmarks/results/ablation-<model>.json (resumed on the next start) and ablation.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from quality import CALIBRATION, MODELS, RATIOS, RESULTS, gather_results, held_out_evaluator
from sglp_llm.api import analyze
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.compare import Comparison
from sglp_llm.data import FORTUNES, prepare_calibration
from sglp_llm.evaluation.evaluate import load_eval_texts
from sglp_llm.model.loading import load_model

SOURCES = {"fortunes": FORTUNES, "paragraphs": None}  # None: the built-in evaluation text
PEERS = ("block-influence", "angular", "sleb")
# name -> settings changed from the defaults (a "method" key: a peer); every SGLP row names the
# gradient score, the loss check's candidates and the groups, so the table does not depend on the defaults
DEFAULT = {"scoring": "loss", "loss_candidates": "all", "loss_screen": "sequences", "loss_screen_errors": 0, "groups": False}
GROUPED = {**DEFAULT, "groups": True}
CONTENDERS = {
    # the loss check of every unprotected block, its first step screened on one calibration
    # sequence; no groups, no backward (measured before the groups left the default as
    # num_segments=1 with the groups on: the same loss check, tests/test_selection.py)
    "default": DEFAULT,
    **{peer: {"method": peer} for peer in PEERS},
    # the default kept to the Fisher groups (the default until they were measured to change nothing)
    "groups": GROUPED,
    # the gradient score orders the loss check's first measurements (its estimates)
    "taylor screen": {**GROUPED, "gradient_score": "taylor", "loss_screen": "taylor"},
    # the gradient score alone, in the groups
    "no loss check (taylor)": {"scoring": "block", "gradient_score": "taylor", "allocation": "size"},
    "paper": {"scoring": "block", "gradient_score": "gradnorm", "auto_k": "reference", "allocation": "size"},
    "sink-free groups": {**GROUPED, "cka_skip_sinks": True},
    # the gradient score shortlists the 3 lowest of each group, the loss confirms among them
    "taylor top-3": {"scoring": "loss", "groups": True, "gradient_score": "taylor", "loss_candidates": 3},
    "fisher top-3": {"scoring": "loss", "groups": True, "gradient_score": "fisher", "loss_candidates": 3},
    # the default since 2026-12-07 (near-ties settled by block influence, bordering a removed block first)
    "default (ties settled)": {**DEFAULT, "loss_ties": "run-then-block-influence"},
    # and with the head scoring each sequence's 32 likeliest tokens per position, its next tokens and
    # a weighted sample of the rest (issue 26: a cheaper measurement; every other row here scores the whole head)
    "vocabulary 32": {**DEFAULT, "loss_ties": "run-then-block-influence", "loss_vocabulary": 32},
    # the default since 2026-12-07's evening: the same with the screen's estimates lowered by one expected
    # error before they stand as bounds, the head narrowed where the vocabulary is large (32 on both)
    "allowance + narrowed head": {**DEFAULT, "loss_ties": "run-then-block-influence", "loss_vocabulary": None,
                                  "loss_screen_errors": 1.0},
    # the allowance alone, with the whole head: which of the two moved a cell
    "allowance + whole head": {**DEFAULT, "loss_ties": "run-then-block-influence", "loss_screen_errors": 1.0},
}


def run_model(name: str, contenders: list[str], eval_max_texts: int, sleb_from_quality: bool) -> dict:
    out = RESULTS / f"ablation-{name}.json"
    result = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    num_blocks = len(find_decoder_blocks(model).layers)
    drops = sorted({CALIBRATION.replace(drop=None, ratio=r).resolve_drop(num_blocks) for r in RATIOS})
    texts = {key: load_eval_texts(source, max_texts=eval_max_texts if source else None) for key, source in SOURCES.items()}

    # runs that drop the same blocks share one evaluation (kept across restarts)
    evaluated = result.setdefault("evaluated", {})
    held_out = held_out_evaluator(model, tokenizer, texts, evaluated)

    result.update(
        model=loaded.name, num_blocks=num_blocks, drops=drops, threads=torch.get_num_threads(),
        sources={key: description for key, (_, description) in texts.items()},
        # a run of some rows keeps the rows earlier runs measured
        contenders={**result.get("contenders", {}), **{c: CONTENDERS[c] for c in contenders}},
    )
    if "dense" not in result:
        result["dense"] = held_out([])
    calibration = prepare_calibration(None, tokenizer, CALIBRATION)
    statistics: dict = {}
    earlier_sleb = {}
    if sleb_from_quality:
        quality = Comparison.load(RESULTS / f"quality-{name}")
        earlier_sleb = {r["drop"]: r for r in quality.runs if r["method"] == "sleb"}
    for contender in contenders:
        for drop in drops:
            key = f"{contender}|{drop}"
            if key in result["runs"]:
                continue
            if contender == "sleb" and drop in earlier_sleb:
                run = earlier_sleb[drop]
                dropped, seconds, origin = run["dropped"], run["analysis_s"], "benchmarks/results/quality (same calibration)"
            else:
                config = CALIBRATION.replace(drop=drop, **CONTENDERS[contender])
                plan = analyze(model, calibration, config, progress=False, statistics_cache=statistics)
                dropped, seconds, origin = plan.dropped, plan.timings["total_s"], "measured here"
            result["runs"][key] = {"dropped": dropped, "analysis_s": seconds, "origin": origin, **held_out(dropped)}
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(contender, drop, result["runs"][key], flush=True)
    return result


def markdown(result: dict) -> str:
    drops, runs = result["drops"], result["runs"]
    names = list(result["contenders"])
    lines = [
        f"## {result['model']}", "",
        f"- blocks: {result['num_blocks']}; calibration: 16 x 256 tokens of the standard-library docstrings, seed 0; "
        f"{result['threads']} torch thread(s)",
        *(f"- held-out `{key}`: {description}" for key, description in result["sources"].items()),
        "- dense: " + ", ".join(f"{key} {ppl:.2f}" for key, ppl in result["dense"].items()),
        "- settings of each row: " + "; ".join(
            f"{name}: " + (", ".join(f"{k}={v}" for k, v in over.items()) or "the defaults")
            for name, over in result["contenders"].items()
        ),
        "- every row scores the loss check's whole head (loss_vocabulary=0) and takes the first step's screened estimates "
        "as bounds (loss_screen_errors=0: the default until 2026-12-07's evening) unless it says otherwise; "
        "`allowance + narrowed head` is the default since then (the screened estimates lowered by one expected error, "
        "the head narrowed to 32 likeliest tokens on both models: robustness.md, `default`); `vocabulary 32` is the "
        "narrowed head alone",
    ]
    origins = {run["origin"] for key, run in runs.items() if key.startswith("sleb|")}
    if origins:
        lines.append(f"- SLEB's blocks and time: {', '.join(sorted(origins))}")
    for key in result["sources"]:
        lines += ["", f"### Held-out perplexity, {key} (**bold**: at most the best of {', '.join(PEERS)})", "",
                  "| run | " + " | ".join(f"drop {d}" for d in drops) + " |", "|---" * (len(drops) + 1) + "|"]
        best_peer = {d: min((runs[f"{p}|{d}"][key] for p in PEERS if f"{p}|{d}" in runs), default=None) for d in drops}
        for name in names:
            cells = []
            for d in drops:
                run = runs.get(f"{name}|{d}")
                if run is None:
                    cells.append("–")
                    continue
                text = f"{run[key]:.2f}"
                cells.append(f"**{text}**" if best_peer[d] is not None and run[key] <= best_peer[d] + 1e-9 else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "### Analysis time (s)", "", "| run | " + " | ".join(f"drop {d}" for d in drops) + " |",
              "|---" * (len(drops) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{runs[f'{name}|{d}']['analysis_s']:.1f}" if f"{name}|{d}" in runs else "–" for d in drops) + " |")
    lines += ["", "### Blocks dropped", "", "| run | " + " | ".join(f"drop {d}" for d in drops) + " |",
              "|---" * (len(drops) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            " ".join(map(str, runs[f"{name}|{d}"]["dropped"])) if f"{name}|{d}" in runs else "–" for d in drops) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--eval-max-texts", type=int, default=50, help="fortunes texts scored (the paragraphs: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sleb-from-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contenders = args.contenders.split(",")
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    models = args.models.split(",")
    for name in models:
        run_model(name, contenders, args.eval_max_texts, args.sleb_from_quality)
    gather_results("ablation", "What each SGLP stage buys (benchmarks/ablation.py)", markdown)


if __name__ == "__main__":
    main()
