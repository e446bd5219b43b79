"""What sampling the model's own text costs: transformers' generate with its own top-p sampling
(a sort and a draw over the whole vocabulary at every step) against sglp's NucleusDraw (the
nucleus found with top-k, one uniform draw per row), the same windows, alternated in one
process, best of 2, 1 torch thread.

    python benchmarks/sampling_cost.py --models smollm2-135m,gemma-3-270m --windows 32 --seq-len 64

Results: benchmarks/results/sampling-cost.json (one entry per model, replaced on a rerun) and sampling-cost.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quality import MODELS, RESULTS
from sglp_llm.model.handle import ModelHandle
from sglp_llm.model.loading import load_model
from sglp_llm.passes.sampling import TOP_P, sample_windows

OUT = RESULTS / "sampling-cost.json"


def generate_top_p(model, tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """The windows as generate's own sampler draws them (what sglp ran before NucleusDraw)."""
    torch.manual_seed(0)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt = torch.full((n, 1), start)
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=TOP_P, top_k=0,
                              temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                              pad_token_id=tokenizer.eos_token_id)


def run_model(name: str, n: int, seq_len: int, repeats: int) -> dict:
    loaded = load_model(name, dtype="float32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    ways = {"generate's top-p": lambda: generate_top_p(model, tokenizer, n, seq_len),
            "NucleusDraw": lambda: sample_windows(ModelHandle.of(model), tokenizer, n, seq_len, 0, progress=False)}
    seconds = {key: [] for key in ways}
    for _ in range(repeats):
        for key, way in ways.items():
            started = time.perf_counter()
            way()
            seconds[key].append(time.perf_counter() - started)
    return {"model": loaded.name, "vocabulary": model.get_output_embeddings().weight.shape[0], "windows": n,
            "seq_len": seq_len, "threads": torch.get_num_threads(), "seconds": seconds}


def markdown(results: dict) -> str:
    lines = ["# Sampling the model's own text: generate's top-p against NucleusDraw (benchmarks/sampling_cost.py)", "",
             "Alternated in one process, best of the repeats; other jobs may share the machine (the ratio is the figure).", "",
             "| model | vocabulary | windows × tokens | generate's top-p (s) | NucleusDraw (s) | speed-up | threads |",
             "|---|---|---|---|---|---|---|"]
    for r in results.values():
        old, new = min(r["seconds"]["generate's top-p"]), min(r["seconds"]["NucleusDraw"])
        lines.append(f"| {r['model']} | {r['vocabulary']:,} | {r['windows']} × {r['seq_len']} | {old:.1f} | {new:.1f} | "
                     f"{old / new:.2f}x | {r['threads']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        result = run_model(name, args.windows, args.seq_len, args.repeats)
        results = json.loads(OUT.read_text()) if OUT.is_file() else {}
        results[name] = result
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "sampling-cost.md").write_text(markdown(results))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
