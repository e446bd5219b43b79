"""Analysis time of SGLP's default against SLEB, side by side in one process, on the quality
benchmark's models and calibration (benchmarks/quality.py), at about 10 % and 30 % dropped, SLEB
measuring each removal on the same calibration tokens as the default's loss check (issue 26).

Each method runs `analyze` from scratch (no statistics shared), SGLP first, then SLEB, then SGLP
again; the SGLP time is the mean of its two runs, which bracket SLEB's in time, so a machine
that gets busier or quieter during the run does not favour one side. The default's time is
given for its choice and with the stability check (on by default). The blocks each chose are
recorded; quality.md has their held-out perplexity.

    python benchmarks/cost.py --models smollm2-135m
    OMP_NUM_THREADS=1 python benchmarks/cost.py --models gemma-3-270m

`--sleb-on-every-token` lets SLEB measure on every calibration token (its own setting) and writes
cost-all-<model>.json; `--loss-vocabulary K` times the default with the head narrowed to K likeliest tokens
(cost-vocabulary-<model>.json), `--loss-vocabulary 0` with the head over the whole vocabulary
(cost-wholehead-<model>.json; without the option, the default's choice for the model: 32 on both). `--kept-outputs` times the default with the loss check starting from the block outputs the
statistics pass keeps, and without. `--head-share` measures instead where a loss-check measurement's time goes: the blocks after the
removed one against the head (final norm, lm_head, loss), on the loss check's 2048 tokens, and
the same with the head on a quarter of the positions (`loss_positions: 0.25`).

Results: benchmarks/results/cost-<model>.json (the default since 2026-12-07's evening; cost-wholehead-<model>.json: the
whole-head default before, its screen's estimates standing as bounds; cost-crossentropy-<model>.json: before the head's NLL was
the logsumexp minus the target's logit; cost-fullhalves-<model>.json: before the stability check read back the loss check's measurements; cost-untied-<model>.json: before near-ties were settled), cost-all-<model>.json (cost-all-fullhalves-<model>.json: the same
before the stability check read back the loss check's measurements and the head was narrowed), cost-kept-<model>.json and cost-head-<model>.json, gathered into
benchmarks/results/cost.md with the earlier measurement (cost-earlier-<model>.json: SLEB on every
calibration token, at 10 % only, before the stability check existed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from quality import CALIBRATION, MODELS, RATIOS, RESULTS
from sglp_llm.api import analyze
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.data import prepare_calibration
from sglp_llm.model.loading import load_model


def measure(name: str, out: Path, sleb_on_every_token: bool = False, ratios: tuple[float, ...] = (RATIOS[0], RATIOS[-1]),
            conditions: str = "", loss_vocabulary: int | None = None) -> None:
    """At about 10 % and 30 % dropped (`ratios`): the default, SLEB on the loss check's tokens (or,
    `sleb_on_every_token`, on every calibration token: SLEB's own setting, issue 23's comparison),
    the default again (its two runs bracket SLEB's in time), in one process; times and blocks,
    written to `out` after each drop, with the `conditions` given (what else ran beside); the drops
    `out` already holds from another run are kept, each with its own conditions."""
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    num_blocks = len(find_decoder_blocks(model).layers)
    calibration = prepare_calibration(None, tokenizer, CALIBRATION)
    # SLEB measures each removal on its first sleb_batches batches: the loss check's tokens, or all
    equal = None if sleb_on_every_token else math.ceil(CALIBRATION.loss_tokens / (CALIBRATION.batch_size * CALIBRATION.seq_len))
    earlier = json.loads(out.read_text()) if out.is_file() else {"cells": []}
    cells = [{"conditions": earlier.get("conditions", ""), **c} for c in earlier["cells"]]
    for ratio in ratios:
        drop = replace(CALIBRATION, ratio=ratio, drop=None).resolve_drop(num_blocks)
        runs = []
        for method in ("sglp", "sleb", "sglp"):
            # SLEB's choice alone: the stability check would run SLEB again on each half
            config = replace(CALIBRATION, drop=drop, method=method, sleb_batches=equal,
                             stability_check=CALIBRATION.stability_check and method == "sglp",
                             loss_vocabulary=loss_vocabulary if method == "sglp" else 0)
            plan = analyze(model, calibration, config, progress=False)
            runs.append({"method": method, "dropped": plan.dropped, "timings": plan.timings})
        sglp = [r["timings"] for r in runs if r["method"] == "sglp"]
        cells = [c for c in cells if c["drop"] != drop] + [{
            "drop": drop, "runs": runs, "sleb_s": runs[1]["timings"]["total_s"], "conditions": conditions,
            # the choice alone, and with the stability check's second analysis (timed apart)
            "sglp_s": sum(t["total_s"] for t in sglp) / 2,
            "sglp_with_stability_s": sum(t["total_s"] + t.get("stability_s", 0.0) for t in sglp) / 2,
        }]
        out.write_text(json.dumps({
            "model": loaded.name, "num_blocks": num_blocks, "cells": cells,
            "sleb_tokens": calibration.n_tokens if equal is None else equal * CALIBRATION.batch_size * CALIBRATION.seq_len,
            "loss_tokens": CALIBRATION.loss_tokens,
            "loss_ties": CALIBRATION.loss_ties, "loss_vocabulary": loss_vocabulary,
            # since 2026-12-07's evening the screen's estimates are lowered by this many expected errors (0 before)
            "loss_screen_errors": CALIBRATION.loss_screen_errors,
            # since 2026-12-07 the head's NLL is the logsumexp minus the target's logit (passes.loss.token_nll)
            "nll": "logsumexp",
            # since 2026-12-07: the loss check's search on each half of its sequences, reading back its measurements
            "stability": "loss-sequence halves",
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        }, indent=2))


def kept_outputs(name: str) -> dict:
    """The default's analysis with the loss check starting from the block outputs the statistics
    pass keeps (sglp_llm.passes.original_outputs) and without (it runs its own first forward), at
    about 10 % and 30 % dropped, alternated with vs without, without, with (the machine's drift
    cancels), in one process: times and the blocks each chose."""
    from sglp_llm.config import SGLPConfig

    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    num_blocks = len(find_decoder_blocks(model).layers)
    calibration = prepare_calibration(None, tokenizer, CALIBRATION)
    keeps = SGLPConfig.keeps_original_outputs
    cells = []
    for ratio in (RATIOS[0], RATIOS[-1]):
        drop = replace(CALIBRATION, ratio=ratio, drop=None).resolve_drop(num_blocks)
        runs = []
        for kept in (True, False, False, True):
            SGLPConfig.keeps_original_outputs = keeps if kept else property(lambda config: False)
            try:
                plan = analyze(model, calibration, replace(CALIBRATION, drop=drop), progress=False)
            finally:
                SGLPConfig.keeps_original_outputs = keeps
            runs.append({"kept": kept, "dropped": plan.dropped, "timings": plan.timings,
                         "steps": plan.extra["loss_check"]["steps"]})
        # the whole analysis: its total and the stability check's second analysis (timed apart)
        mean = {kept: sum(r["timings"]["total_s"] + r["timings"].get("stability_s", 0.0) for r in runs if r["kept"] == kept) / 2
                for kept in (True, False)}
        cells.append({"drop": drop, "runs": runs, "with_s": mean[True], "without_s": mean[False],
                      "same_steps": all(r["steps"] == runs[0]["steps"] for r in runs)})
    return {"model": loaded.name, "num_blocks": num_blocks, "cells": cells, "threads": torch.get_num_threads(),
            "stability_check": CALIBRATION.stability_check}


def head_share(name: str) -> dict:
    """Seconds of every block's forward and of the head on the loss check's tokens (best of 2),
    with the head on all positions and on a quarter of them."""
    from sglp_llm.data import first_tokens
    from sglp_llm.model.handle import ModelHandle
    from sglp_llm.passes.head import head_nll, output_of, position_sample

    loaded = load_model(name, dtype="float32")
    handle = ModelHandle.of(loaded.model)
    batches = first_tokens(prepare_calibration(None, loaded.tokenizer, CALIBRATION).batches, CALIBRATION.loss_tokens)
    best: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            finals = [output_of(handle.model, handle.layers[-1], b) for b in batches]
            best["blocks"] = min(best.get("blocks", math.inf), time.perf_counter() - started)
            for share in (1.0, 0.25):
                started = time.perf_counter()
                for b, (final, arity) in zip(batches, finals):
                    head_nll(handle, b, final, arity, positions=position_sample(b["input_ids"].shape[1] - 1, share, 0))
                key = f"head at {share:g} of the positions"
                best[key] = min(best.get(key, math.inf), time.perf_counter() - started)
    return {"model": loaded.name, "num_blocks": len(handle.layers), "tokens": sum(b["input_ids"].numel() for b in batches),
            "seconds": best, "threads": torch.get_num_threads()}


def _head(result: dict) -> str:
    """What the default's head scored in a cost run (runs before the option scored the whole vocabulary)."""
    vocabulary = result.get("loss_vocabulary", 0)
    if vocabulary is None:
        return "the head narrowed where the vocabulary is large (the default since 2026-12-07's evening: 32 here)"
    return f"--loss-vocabulary {vocabulary}" if vocabulary else "the head over the whole vocabulary"


def gather() -> Path:
    lines = [
        "# Analysis time: SGLP default vs SLEB, side by side (benchmarks/cost.py)", "",
        "In one process: the default, SLEB, the default again (its time: the mean of its two runs, which bracket "
        "SLEB's). SLEB measures each removal on the same calibration tokens as the default's loss check, or "
        "(`--sleb-on-every-token`) on every calibration token, as SLEB itself does. The default's time is given "
        "for its choice alone and with the stability check (on by default; since 2026-12-07 the loss check's search on "
        "each half of its sequences, reading back what the choice measured; before, the second half of the calibration "
        "analysed in full). Calibration: "
        f"{CALIBRATION.n_samples} windows of {CALIBRATION.seq_len} docstring tokens, prepared before either runs "
        "(so neither time includes it).", "",
        "| model | drop | default | tokens per removal (default / SLEB) | default: choice (s) | with the stability check (s) "
        "| SLEB (s) | SLEB / choice | SLEB / with the check | same blocks? | threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    measured = [json.loads(p.read_text()) for name in MODELS
                for kind in ("", "wholehead-", "crossentropy-", "vocabulary-", "all-", "all-fullhalves-", "fullhalves-", "untied-")
                if (p := RESULTS / f"cost-{kind}{name}.json").is_file()]
    if not measured:
        lines[-2:] = ["Not run yet: `python benchmarks/cost.py`."]
    for r in measured:
        # the loss check's near-ties are settled by default since 2026-12-07; runs before say so
        default = f"loss_ties {r['loss_ties']}" if "loss_ties" in r else "before near-ties were settled (2026-12-06)"
        default += f"; {_head(r)}"
        errors = r.get("loss_screen_errors", 0)  # runs before 2026-12-07's evening took the screen's estimates as bounds
        default += f"; the screen's estimates lowered by {errors:g} expected error" if errors else "; the screen's estimates as bounds"
        default += ("; stability: the loss check's halves" if "stability" in r else
                    "; stability: the second calibration half analysed in full (before 2026-12-07's rework)")
        if "nll" not in r:
            default += "; the head's NLL by cross_entropy over transposed logits (before 2026-12-07's logsumexp)"
        for c in r["cells"]:
            ours, sleb = c["runs"][0]["dropped"], c["runs"][1]["dropped"]
            lines.append(
                f"| {r['model']} | {c['drop']} | {default} | {r['loss_tokens']} / {r['sleb_tokens']} | {c['sglp_s']:.0f} "
                f"| {c['sglp_with_stability_s']:.0f} | {c['sleb_s']:.0f} | {c['sleb_s'] / c['sglp_s']:.1f}x "
                f"| {c['sleb_s'] / c['sglp_with_stability_s']:.1f}x | {'yes' if ours == sleb else 'no'} ({ours} vs {sleb}) "
                f"| {r['threads']} |")
    conditions = [f"- {r['model']}, drop {c['drop']}, {r['loss_tokens']} / {r['sleb_tokens']} tokens, "
                  f"{_head(r)}: "
                  f"{c.get('conditions', r.get('conditions'))}"
                  for r in measured for c in r["cells"] if c.get("conditions", r.get("conditions"))]
    lines += [""] + conditions if conditions else []
    earlier = [json.loads(p.read_text()) for name in MODELS if (p := RESULTS / f"cost-earlier-{name}.json").is_file()]
    if earlier:
        lines += ["", "## Earlier (2026-11-26): SLEB on every calibration token, the default before the stability check", "",
                  "| model | drop | SGLP default (s, mean of 2) | SLEB (s) | SLEB / SGLP | same blocks? | threads |",
                  "|---|---|---|---|---|---|---|"]
        for r in earlier:
            same = r["runs"][0]["dropped"] == r["runs"][1]["dropped"]
            lines.append(f"| {r['model']} | {r['drop']} | {r['sglp_s']:.0f} | {r['sleb_s']:.0f} | {r['ratio']:.1f}x "
                         f"| {'yes' if same else 'no'} ({r['runs'][0]['dropped']} vs {r['runs'][1]['dropped']}) | {r['threads']} |")
    heads = [json.loads(p.read_text()) for name in MODELS if (p := RESULTS / f"cost-head-{name}.json").is_file()]
    if heads:
        lines += ["", "## Where a loss-check measurement's time goes (`--head-share`)", "",
                  "A measurement runs the blocks after the removed one (half of them on average) and the head; "
                  "the head's share of an average measurement is head / (blocks / 2 + head).", "",
                  "| model | tokens | all blocks (s) | head, all positions (s) | head share | head, a quarter of the positions (s) "
                  "| head share | threads |", "|---|---|---|---|---|---|---|---|"]
        for r in heads:
            t = r["seconds"]
            full, quarter = t["head at 1 of the positions"], t["head at 0.25 of the positions"]
            lines.append(f"| {r['model']} | {r['tokens']} | {t['blocks']:.1f} | {full:.1f} | {full / (t['blocks'] / 2 + full):.0%} "
                         f"| {quarter:.1f} | {quarter / (t['blocks'] / 2 + quarter):.0%} | {r['threads']} |")
    kept = [json.loads(p.read_text()) for name in MODELS if (p := RESULTS / f"cost-kept-{name}.json").is_file()]
    if kept:
        lines += ["", "## The loss check starting from the statistics pass's block outputs (`--kept-outputs`)", "",
                  "The default analysis (calibration as above, the stability check's second analysis included) with the "
                  "loss check starting from the block outputs the "
                  "statistics pass keeps on its tokens, against the same analysis running its own first forward: "
                  "mean of two runs each, alternated with / without / without / with, in one process.", "",
                  "| model | drop | with (s) | without (s) | saved | same steps and blocks? | stability check | threads |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in kept:
            for c in r["cells"]:
                lines.append(f"| {r['model']} | {c['drop']} | {c['with_s']:.1f} | {c['without_s']:.1f} | "
                             f"{1 - c['with_s'] / c['without_s']:.1%} | {'yes' if c['same_steps'] else 'NO'} "
                             f"({c['runs'][0]['dropped']}) | {'on' if r['stability_check'] else 'off'} | {r['threads']} |")
    target = RESULTS / "cost.md"
    target.write_text("\n".join(lines) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--head-share", action="store_true", help="where a measurement's time goes, not SGLP vs SLEB")
    parser.add_argument("--sleb-on-every-token", action="store_true",
                        help="SLEB measures each removal on every calibration token (its own setting), not the default's loss tokens")
    parser.add_argument("--ratios", default=f"{RATIOS[0]},{RATIOS[-1]}", help="comma-separated fractions of blocks dropped")
    parser.add_argument("--conditions", default="", help="what else shared the machine, written beside the figures")
    parser.add_argument("--loss-vocabulary", type=int, default=None,
                        help="the default with --loss-vocabulary K (writes cost-vocabulary-<model>.json; "
                             "0: the whole head, cost-wholehead-<model>.json)")
    parser.add_argument("--kept-outputs", action="store_true",
                        help="the default with and without the statistics pass's kept block outputs, not SGLP vs SLEB")
    args = parser.parse_args()
    for name in args.models.split(","):
        if args.kept_outputs:
            (RESULTS / f"cost-kept-{name}.json").write_text(json.dumps(kept_outputs(name), indent=2))
        elif args.head_share:
            (RESULTS / f"cost-head-{name}.json").write_text(json.dumps(head_share(name), indent=2))
        else:
            kind = ("all-" if args.sleb_on_every_token else "" if args.loss_vocabulary is None
                    else "vocabulary-" if args.loss_vocabulary else "wholehead-")
            measure(name, RESULTS / f"cost-{kind}{name}.json", args.sleb_on_every_token,
                    tuple(float(r) for r in args.ratios.split(",")), args.conditions, args.loss_vocabulary)
        print(f"wrote {gather()}")


if __name__ == "__main__":
    main()
