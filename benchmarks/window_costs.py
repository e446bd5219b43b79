"""What one block's removal costs each window, on the calibration samples and on held-out text
(issue 23): is a calibration sample's preference for a block held by most of its windows (a text
effect) or by a few outliers (which an outlier-robust loss, e.g. the median over windows, would fix)?

For SmolLM2-135M or Gemma-3-270M: the loss check's windows of the robustness benchmark's two
docstring samples (256 tokens, seeds 0 and 1, the first 2048 tokens: what the default reads), and
the first 16 held-out fortunes and paragraphs (each truncated to 256 tokens); for the dense
model and for each block skipped alone, each window's mean next-token NLL.

    python benchmarks/window_costs.py --models smollm2-135m

Results: benchmarks/results/window-costs-<model>.json and window-costs.md.
"""

from __future__ import annotations

import statistics

import torch

from quality import RESULTS, measure_models
from sglp_llm.config import SGLPConfig
from sglp_llm.data import FORTUNES, STDLIB_DOCS, first_tokens, prepare_calibration
from sglp_llm.evaluation.evaluate import load_eval_texts
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.model.loading import load_model
from sglp_llm.model.rewrite import skip_blocks

HELD_OUT = {"fortunes": FORTUNES, "paragraphs": None}  # None: the built-in evaluation text
HELD_OUT_WINDOWS = 16


@torch.no_grad()
def _window_nll(model, batches) -> list[float]:
    """Each window's mean next-token NLL over its non-padding targets."""
    out = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        mask = batch["attention_mask"][:, 1:]
        out += ((nll * mask).sum(1) / mask.sum(1)).tolist()
    return out


def measure(name: str) -> dict:
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    num_blocks = len(find_decoder_blocks(model).layers)
    samples = {}
    for seed in (0, 1):
        config = SGLPConfig(drop=1, dataset=STDLIB_DOCS, seq_len=256, seed=seed)
        samples[f"docstrings, seed {seed}"] = first_tokens(prepare_calibration(None, tokenizer, config).batches, config.loss_tokens)
    for key, source in HELD_OUT.items():
        texts, _ = load_eval_texts(source, max_texts=30)
        samples[key] = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=256)) for t in texts[:HELD_OUT_WINDOWS]]
    windows = {}
    for key, batches in samples.items():
        windows[key] = {"dense": _window_nll(model, batches)}
        for block in range(num_blocks):
            with skip_blocks(model, [block]):
                windows[key][str(block)] = _window_nll(model, batches)
        print(name, key, flush=True)
    result = {"model": loaded.name, "num_blocks": num_blocks, "windows": windows}
    (RESULTS / f"window-costs-{name}.json").write_text(__import__("json").dumps(result, indent=1) + "\n")
    return result


def markdown(result: dict) -> str:
    blocks = range(1, result["num_blocks"] - 1)  # the default protects the first and the last
    lines = [f"## {result['model']}", "",
             "Per source: the blocks whose removal alone raises the NLL least, by the mean over windows (what the "
             "loss check ranks by) and by the median; the rise in nats.", "",
             "| source | windows | cheapest by the mean | cheapest by the median |", "|---|---|---|---|"]
    for key, runs in result["windows"].items():
        dense = runs["dense"]
        rise = {b: [x - d for x, d in zip(runs[str(b)], dense)] for b in blocks}
        mean = {b: statistics.mean(v) for b, v in rise.items()}
        median = {b: statistics.median(v) for b, v in rise.items()}
        show = lambda by: ", ".join(f"{b} ({by[b]:.3f})" for b in sorted(blocks, key=lambda b: (by[b], b))[:6])  # noqa: E731
        lines.append(f"| {key} | {len(dense)} | {show(mean)} | {show(median)} |")
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    measure_models(__doc__, measure, "window-costs", "One block's removal, window by window (benchmarks/window_costs.py)", markdown)
