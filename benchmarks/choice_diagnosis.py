"""Why does the default's choice fail on held-out text in some cells of the robustness table
(issue 23)? Four measurements on the cells of benchmarks/results/robustness-<model>.json:

1. The search or the criterion? In each cell and drop, the default's set and the set with the best
   held-out perplexity among all those the table evaluated at that drop (geometric mean over the
   sources) are compared by the criterion itself: the next-token NLL on the loss check's search
   tokens (the first 2048) and on the rest of the calibration windows. Where the search tokens
   prefer the held-out winner, the greedy search missed a set its own criterion ranks better
   (myopia); where they prefer the default's, the criterion is misled.
2. By position: the NLL increase of those two sets in buckets of window position, on the
   calibration windows and on the held-out texts (each scored from its start, as evaluation
   scores them): do long contexts, which dominate a window's mean, decide differently?
3. Contiguous runs (in the seed-1 cells, where the default fails): each run of 1, 2 and 3 blocks
   removed, by the NLL increase on the search tokens: is the held-out winner's run cheap as a
   whole while its blocks are not cheap alone?
4. Seeded (the same cells): the loss check continued from the cheapest run of three (the default analysis on the
   model without that run), against the default's greedy set, by the NLL on the search tokens:
   would a search that also starts from the cheapest run, keeping whichever set its criterion
   ranks better, pick the held-out winner?

    python benchmarks/choice_diagnosis.py --models smollm2-135m --threads 1

Results: benchmarks/results/choice-diagnosis-<model>.json (resumed) and choice-diagnosis.md.
"""

from __future__ import annotations

import copy
import json
import math
import time

import torch

from quality import RESULTS, measure_models
from robustness import SOURCES
from quality import held_out_evaluator
from sglp_llm.api import analyze
from sglp_llm.config import SGLPConfig
from sglp_llm.data import STDLIB_DOCS, first_tokens, prepare_calibration
from sglp_llm.evaluation.evaluate import load_eval_texts
from sglp_llm.model.loading import load_model
from sglp_llm.model.rewrite import removing_blocks, skip_blocks

LOSS_TOKENS = SGLPConfig(drop=1).loss_tokens
EDGES = (0, 8, 32, 96, 256)  # position buckets
HELD_OUT_TEXTS = 30
RUN_WIDTHS = (1, 2, 3)
NEAR = 1.05  # a default's set this close to the winner's held-out perplexity (geometric mean) is as good
POSITION_CELL = "256|1"  # the cell whose sets are also scored on the held-out texts by position
RUNS_CELLS = ("128|1", "256|1")  # the cells whose search tokens score every contiguous run, and seed a search


def _winner(robustness: dict, drop: str) -> list[int]:
    """The set with the lowest geometric-mean held-out perplexity among the evaluated sets of `drop` blocks."""
    sets = [list(map(int, key.split(","))) for key in robustness["evaluated"] if key and len(key.split(",")) == int(drop)]
    return min(sets, key=lambda b: sum(math.log(v) for v in robustness["evaluated"][",".join(map(str, b))].values()))


@torch.no_grad()
def _position_nll(model, batches) -> tuple[list[float], list[float]]:
    """The mean next-token NLL per position bucket (EDGES), and per window."""
    sums = torch.zeros(len(EDGES) - 1, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    windows = []
    for batch in batches:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").double()
        windows += nll.mean(1).tolist()
        position = torch.arange(nll.shape[1])
        for i, (low, high) in enumerate(zip(EDGES, EDGES[1:])):
            inside = (position >= low) & (position < high)
            sums[i] += nll[:, inside].sum()
            counts[i] += nll[:, inside].numel()
    return (sums / counts.clamp(min=1)).tolist(), windows


def _search_nll(model, search, blocks: list[int]) -> float:
    """The mean of the windows' NLL on the search tokens with `blocks` skipped."""
    with skip_blocks(model, blocks):
        windows = _position_nll(model, search)[1]
    return sum(windows) / len(windows)


def measure(name: str) -> dict:
    robustness = json.loads((RESULTS / f"robustness-{name}.json").read_text())
    out = RESULTS / f"choice-diagnosis-{name}.json"
    result = json.loads(out.read_text()) if out.is_file() else {"cells": {}, "runs": {}}
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    result.update(key=name, model=loaded.name, threads=torch.get_num_threads(), loss_tokens=LOSS_TOKENS, edges=list(EDGES))
    texts = {key: load_eval_texts(source, max_texts=HELD_OUT_TEXTS) for key, source in SOURCES.items()}
    held_out = [{"input_ids": tokenizer(text, return_tensors="pt")["input_ids"][:, :EDGES[-1]]}
                for source_texts, _ in texts.values() for text in source_texts]

    def save() -> None:
        out.write_text(json.dumps(result, indent=1) + "\n")

    cells = sorted({key.rsplit("|", 1)[0] for key in robustness["runs"] if key.endswith("|default")})
    calibrations = {}
    for cell in cells:
        seq_len, seed = map(int, cell.split("|"))
        calibration = calibrations[cell] = prepare_calibration(
            None, tokenizer, SGLPConfig(drop=1, dataset=STDLIB_DOCS, seq_len=seq_len, seed=seed))
        n_search = sum(len(b["input_ids"]) for b in first_tokens(calibration.batches, LOSS_TOKENS))
        record = result["cells"].setdefault(cell, {"search_windows": n_search, "sets": {}})
        sets = [[]]
        for drop, blocks in robustness["runs"][f"{cell}|default"]["dropped"].items():
            sets += [blocks, _winner(robustness, drop)]
        for blocks in sets:
            key = ",".join(map(str, blocks))
            if key in record["sets"]:
                continue
            started = time.perf_counter()
            with skip_blocks(model, blocks):
                positions, windows = _position_nll(model, calibration.batches)
                held_positions, _ = _position_nll(model, held_out) if cell == POSITION_CELL else (None, None)
            record["sets"][key] = {"windows": windows, "positions": positions, "held_out_positions": held_positions}
            save()
            print(name, cell, key or "dense", f"{time.perf_counter() - started:.0f} s", flush=True)
    held_out_ppl = held_out_evaluator(model, tokenizer, texts, robustness["evaluated"])
    for cell in RUNS_CELLS:
        _runs_and_seeded(model, tokenizer, robustness, result, cell, calibrations[cell], held_out_ppl, save)
    return result


def _runs_and_seeded(model, tokenizer, robustness: dict, result: dict, cell: str, calibration, held_out_ppl, save) -> None:
    """Sections 3 and 4 on `cell`: every contiguous run on its search tokens, then the loss check
    continued from the cheapest run of three against the default's set."""
    seq_len, seed = map(int, cell.split("|"))
    search = first_tokens(calibration.batches, LOSS_TOKENS)
    scanned = result.setdefault("runs", {}).setdefault(cell, {})
    num_blocks = robustness["num_blocks"]
    for width in RUN_WIDTHS:
        for start in range(1, num_blocks - width):
            key = ",".join(map(str, range(start, start + width)))
            if key not in scanned:
                scanned[key] = _search_nll(model, search, list(range(start, start + width)))
                save()
    if "" not in scanned:
        scanned[""] = _search_nll(model, search, [])
        save()
    seed_run = min((v, k) for k, v in scanned.items() if k and len(k.split(",")) == 3)[1]
    run = list(map(int, seed_run.split(",")))
    kept = [i for i in range(num_blocks) if i not in run]
    seeded = result.setdefault("seeded", {}).setdefault(cell, {"run": run, "drops": {}})
    todo = [drop for drop in map(str, robustness["drops"]) if drop not in seeded["drops"]]
    if todo:
        pruned = copy.deepcopy(model)
        removing_blocks(pruned, run)
    for drop in todo:
        extra = int(drop) - len(run)
        chosen = sorted(run + [kept[i] for i in analyze(pruned, calibration, SGLPConfig(
            drop=extra, dataset=STDLIB_DOCS, seq_len=seq_len, seed=seed, stability_check=False), tokenizer=tokenizer,
            progress=False).dropped]) if extra > 0 else run
        default = robustness["runs"][f"{cell}|default"]["dropped"][drop]
        losses = {",".join(map(str, blocks)): _search_nll(model, search, blocks) for blocks in (default, chosen)}
        seeded["drops"][drop] = {"default": default, "seeded": chosen, "search_nll": losses,
                                 "held_out": {",".join(map(str, b)): held_out_ppl(b) for b in (default, chosen)}}
        save()


def markdown(result: dict) -> str:
    robustness = json.loads((RESULTS / f"robustness-{result['key']}.json").read_text())
    sources = list(robustness["dense"])

    def ppl(key: str) -> str:
        return " / ".join(f"{robustness['evaluated'][key][s]:.1f}" for s in sources)

    lines = [f"## {result['model']}", "",
             f"- calibration: 32 windows of the docstrings per cell (as robustness.py); search tokens: the first "
             f"{result['loss_tokens']}; rest: the other windows; held out ({', '.join(sources)}): perplexity from robustness.md; "
             f"{result['threads']} torch thread(s)", "",
             "### The search or the criterion: the default's set against the held-out winner, by the criterion", "",
             "| cell | drop | default's set (held out) | winner (held out) | NLL on search tokens: default / winner | on the rest | search prefers |",
             "|---|---|---|---|---|---|---|"]
    for cell, record in result["cells"].items():
        n = record["search_windows"]
        for drop, blocks in robustness["runs"][f"{cell}|default"]["dropped"].items():
            mine, best = ",".join(map(str, blocks)), ",".join(map(str, _winner(robustness, drop)))
            if mine not in record["sets"] or best not in record["sets"]:
                continue
            a, b = record["sets"][mine]["windows"], record["sets"][best]["windows"]
            search = (sum(a[:n]) / n, sum(b[:n]) / n)
            rest = (sum(a[n:]) / len(a[n:]), sum(b[n:]) / len(b[n:]))
            gap = math.exp(sum(math.log(robustness["evaluated"][mine][x] / robustness["evaluated"][best][x]) for x in sources) / len(sources))
            verdict = ("same set" if mine == best else f"default's within {NEAR - 1:.0%} of the winner held out" if gap <= NEAR
                       else "the winner (search missed it)" if search[1] < search[0] else "the default's (criterion misled)")
            lines.append(f"| {cell.replace('|', ' tokens, seed ')} | {drop} | [{mine}] ({ppl(mine)}) | [{best}] ({ppl(best)}) | "
                         f"{search[0]:.3f} / {search[1]:.3f} | {rest[0]:.3f} / {rest[1]:.3f} | {verdict} |")
    edges = result["edges"]
    buckets = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    for cell, record in result["cells"].items():
        dense = record["sets"][""]
        rows = [(key, s) for key, s in record["sets"].items() if key and s["held_out_positions"] is not None]
        if not rows:
            continue
        lines += ["", f"### By position ({cell.replace('|', ' tokens, seed ')}): NLL increase over the dense model, "
                  "calibration windows | held-out texts", "",
                  "| set | " + " | ".join(f"cal. {b}" for b in buckets) + " | " + " | ".join(f"held {b}" for b in buckets) + " |",
                  "|---|" + "---|" * (2 * len(buckets))]
        for key, s in rows:
            lines.append(f"| [{key}] | " + " | ".join(f"{x - d:+.3f}" for x, d in zip(s["positions"], dense["positions"])) + " | "
                         + " | ".join(f"{x - d:+.3f}" for x, d in zip(s["held_out_positions"], dense["held_out_positions"])) + " |")
    for cell, scanned in result.get("runs", {}).items():
        if scanned.get("") is None:
            continue
        base = scanned[""]
        lines += ["", f"### Contiguous runs removed ({cell.replace('|', ' tokens, seed ')}): NLL increase on the "
                  "search tokens, the 8 cheapest of each width", "", "| width | cheapest runs (increase) |", "|---|---|"]
        for width in RUN_WIDTHS:
            runs = sorted((v - base, k) for k, v in scanned.items() if k and len(k.split(",")) == width)
            lines.append(f"| {width} | " + ", ".join(f"[{k}] {v:+.3f}" for v, k in runs[:8]) + " |")
    for cell, seeded in result.get("seeded", {}).items():
        lines += ["", f"### Seeded ({cell.replace('|', ' tokens, seed ')}): the loss check continued from the "
                  f"cheapest run of three, [{','.join(map(str, seeded['run']))}], against the default's greedy set", "",
                  "| drop | default's set: search NLL, held out | seeded set: search NLL, held out | the search loss keeps |",
                  "|---|---|---|---|"]
        for drop, row in seeded["drops"].items():
            cells = []
            for blocks in (row["default"], row["seeded"]):
                key = ",".join(map(str, blocks))
                cells.append(f"[{key}]: {row['search_nll'][key]:.3f}, "
                             + " / ".join(f"{row['held_out'][key][s]:.1f}" for s in sources))
            keeps = min((row["search_nll"][",".join(map(str, b))], name) for name, b in (("default's", row["default"]), ("seeded", row["seeded"])))[1]
            lines.append(f"| {drop} | {cells[0]} | {cells[1]} | {keeps} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    measure_models(__doc__, measure, "choice-diagnosis", "Why the default's choice fails where it does "
                   "(benchmarks/choice_diagnosis.py, issue 23)", markdown)


if __name__ == "__main__":
    main()
