"""Issue 23's ensemble candidate, measured on the robustness table: instead of the loss check's
choice alone, take the choices of the loss check, block influence and angular distance, and keep
the one with the lowest next-token loss on held-back calibration text. Would that choice hold on
the held-out sources?

For every cell of benchmarks/results/robustness-<model>.json (window length, seed, drop), the
calibration is the mixed one (`default-mixed`: docstrings and the Python reference, alternating,
32 windows); its windows after the loss check's first 2048 tokens are held back. Each candidate
set's per-window NLL is measured once with the blocks skipped. Rules compared: the pool
{loss check on the docstrings, block influence, angular} and {loss check on the mixed text, block
influence, angular}, decided on the held-back windows ("held") or on all 32 ("all"). The ratio is
that of robustness.md: the picked set's perplexity over the best peer's, worst over the sources.

    python benchmarks/pool_decision.py --models smollm2-135m --threads 1

Results: benchmarks/results/pool-decision-<model>.json (resumed) and pool-decision.md.
"""

from __future__ import annotations

import json
import time

import torch

from quality import RESULTS, measure_models
from robustness import _calibration
from sglp_llm.config import SGLPConfig
from sglp_llm.data import STDLIB_DOCS
from sglp_llm.model.loading import load_model
from sglp_llm.model.rewrite import skip_blocks

LOSS_TOKENS = SGLPConfig(drop=1).loss_tokens  # the loss check's search tokens: held back from the decision
POOLS = {"default": ("default", "block-influence", "angular"), "default-mixed": ("default-mixed", "block-influence", "angular")}
PEERS = ("block-influence", "angular", "sleb")


def _cells(robustness: dict) -> list[str]:
    return sorted({key.rsplit("|", 1)[0] for key in robustness["runs"]}, key=lambda c: (-int(c.split("|")[0]), c))


@torch.no_grad()
def _window_nlls(model, batches) -> list[float]:
    """Each window's mean next-token NLL (the windows are full: no padding)."""
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out += nll.view(ids.shape[0], -1).mean(1).tolist()
    return out


def measure(name: str) -> dict:
    robustness = json.loads((RESULTS / f"robustness-{name}.json").read_text())
    out = RESULTS / f"pool-decision-{name}.json"
    result = json.loads(out.read_text()) if out.is_file() else {"nll": {}}
    loaded = load_model(name, dtype="float32")
    base = SGLPConfig(drop=1, dataset=STDLIB_DOCS, stability_check=False)
    result.update(key=name, model=loaded.name, threads=torch.get_num_threads(), loss_tokens=LOSS_TOKENS)
    for cell in _cells(robustness):
        seq_len, seed = map(int, cell.split("|"))
        calibration = _calibration(loaded.tokenizer, base.replace(seq_len=seq_len, seed=seed), ["docstrings", "python-reference"])
        sets = []
        for method in {m for pool in POOLS.values() for m in pool}:
            for blocks in robustness["runs"].get(f"{cell}|{method}", {}).get("dropped", {}).values():
                if blocks not in sets:
                    sets.append(blocks)
        for blocks in sorted(sets):
            key = cell + "|" + ",".join(map(str, blocks))
            if key in result["nll"]:
                continue
            started = time.perf_counter()
            with skip_blocks(loaded.model, blocks):
                result["nll"][key] = _window_nlls(loaded.model, calibration.batches)
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(name, key, f"{sum(result['nll'][key]) / len(result['nll'][key]):.4f}", f"{time.perf_counter() - started:.0f} s", flush=True)
    return result


def markdown(result: dict) -> str:
    robustness = json.loads((RESULTS / f"robustness-{result['key']}.json").read_text())
    runs, sources = robustness["runs"], list(robustness["dense"])

    def ppl(blocks: list[int], source: str) -> float:
        return robustness["evaluated"][",".join(map(str, blocks))][source]

    lines = [f"## {result['model']}", "",
             f"- held back: each cell's mixed calibration windows after the first {result['loss_tokens']} tokens; "
             f"{result['threads']} torch thread(s)",
             "- ratio: the set's perplexity over the best peer's (block influence, angular, SLEB where run), worst over "
             + ", ".join(sources), "",
             "| cell | drop | pool | loss check alone | picked (held back) | picked (all windows) |", "|---|---|---|---|---|---|"]
    worst: dict[str, list[float]] = {}
    for cell in _cells(robustness):
        skip = result["loss_tokens"] // int(cell.split("|")[0])
        for drop in map(str, robustness["drops"]):
            peers = [runs[f"{cell}|{p}"]["dropped"][drop] for p in PEERS if f"{cell}|{p}" in runs]

            def ratio(blocks: list[int]) -> float:
                return max(ppl(blocks, s) / min(ppl(b, s) for b in peers) for s in sources)

            for pool_name, pool in POOLS.items():
                if not all(f"{cell}|{m}" in runs for m in pool):
                    continue
                candidates = {m: runs[f"{cell}|{m}"]["dropped"][drop] for m in pool}
                nll = {m: result["nll"].get(cell + "|" + ",".join(map(str, b))) for m, b in candidates.items()}
                if any(v is None for v in nll.values()):
                    continue
                picks = {}
                for rule, part in (("held", slice(skip, None)), ("all", slice(None))):
                    score = {m: sum(v[part]) / len(v[part]) for m, v in nll.items()}
                    picks[rule] = min(score, key=score.get)
                    worst.setdefault(f"{pool_name} pool, {rule}", []).append(ratio(candidates[picks[rule]]))
                worst.setdefault(f"{pool_name} alone", []).append(ratio(candidates[pool[0]]))
                lines.append(f"| {cell.replace('|', ' tokens, seed ')} | {drop} | {pool_name} | {ratio(candidates[pool[0]]):.2f} | "
                             + " | ".join(f"{picks[r]} {ratio(candidates[picks[r]]):.2f}" for r in ("held", "all")) + " |")
    lines += ["", "| rule | worst ratio | cells |", "|---|---|---|"]
    lines += [f"| {rule} | {max(r):.2f} | {len(r)} |" for rule, r in worst.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    measure_models(__doc__, measure, "pool-decision", "Deciding among the peers' choices on held-back calibration text "
                   "(benchmarks/pool_decision.py, issue 23)", markdown)


if __name__ == "__main__":
    main()
