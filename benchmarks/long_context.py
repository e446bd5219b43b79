"""Do the blocks chosen on short contexts hold on long ones? The held-out sources of
robustness.py are short documents, and a criterion that scores only short contexts (its
`self-generated-context-64`, the loss check on 64-token windows) could hide damage that only long
contexts show. This scores the choices robustness.py recorded on whole long documents (two licence
texts, the first 12k characters of GPL-3 and Apache-2.0, about 5k tokens), windows of 1024 tokens every 512 (each token scored once, with 512 or
more tokens of context after the first window).

    python benchmarks/long_context.py --models smollm2-135m

Results: benchmarks/results/long-context-<model>.json and long-context.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quality import RESULTS, measure_models
from sglp_llm.evaluation.evaluate import perplexity
from sglp_llm.model.loading import load_model
from sglp_llm.model.rewrite import removing_blocks

LICENCES = Path("/usr/share/common-licenses")
DOCUMENTS = ("GPL-3", "Apache-2.0")
CHARACTERS = 12_000  # of each: about 2.5k tokens, five windows (a CPU scores a set in about a minute)
MAX_LENGTH, STRIDE = 1024, 512
# robustness.py's methods whose recorded choices are scored (the peers, the default, the candidates)
METHODS = ("block-influence", "angular", "default", "docstrings", "self-generated-context-64")


def run_model(name: str) -> None:
    out = RESULTS / f"long-context-{name}.json"
    robustness = json.loads((RESULTS / f"robustness-{name}.json").read_text())
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    texts = [(LICENCES / d).read_text()[:CHARACTERS] for d in DOCUMENTS]
    result = json.loads(out.read_text()) if out.is_file() else {"perplexity": {}}
    result.update(model=loaded.name, documents=list(DOCUMENTS), max_length=MAX_LENGTH, stride=STRIDE,
                  drops=robustness["drops"], threads=torch.get_num_threads())
    choices: dict[str, dict[str, list[str]]] = {}  # drop -> blocks -> the runs that chose them
    for key, run in robustness["runs"].items():
        setting, method = key.rsplit("|", 1)
        if method in METHODS:
            for drop, blocks in run["dropped"].items():
                choices.setdefault(drop, {}).setdefault(" ".join(map(str, blocks)), []).append(f"{setting}|{method}")
    result["choices"] = choices
    out.write_text(json.dumps(result, indent=2) + "\n")  # the choices are current even when every set was scored before
    for blocks in ["", *sorted({b for by_drop in choices.values() for b in by_drop})]:
        if blocks in result["perplexity"]:
            continue
        restore = removing_blocks(model, [int(b) for b in blocks.split()]) if blocks else None
        with torch.no_grad():
            ppl = perplexity(model, tokenizer, texts, max_length=MAX_LENGTH, stride=STRIDE, progress=False)["perplexity"]
        if restore is not None:
            restore()
        result["perplexity"][blocks] = ppl
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(name, blocks or "dense", round(ppl, 2), flush=True)


def markdown(result: dict) -> str:
    ppl = result["perplexity"]
    lines = [f"## {result['model']}", "",
             f"- documents: the first {CHARACTERS:,} characters of {', '.join(result['documents'])} from "
             f"/usr/share/common-licenses; windows of "
             f"{result['max_length']} tokens every {result['stride']}; dense perplexity {ppl['']:.2f}", "",
             "| drop | blocks | perplexity | chosen by (setting: seq_len|seed, method) |", "|---|---|---|---|"]
    for drop in map(str, result["drops"]):
        for blocks, runs in sorted(result["choices"].get(drop, {}).items(), key=lambda x: ppl.get(x[0], float("inf"))):
            if blocks in ppl:
                lines.append(f"| {drop} | [{blocks}] | {ppl[blocks]:.2f} | {', '.join(sorted(runs))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    measure_models(__doc__, run_model, "long-context", "Long contexts: the recorded choices on whole long documents "
                   "(benchmarks/long_context.py)", markdown)


if __name__ == "__main__":
    main()
