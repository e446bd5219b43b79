"""What recovery wins back after the default's drop: next-token LoRA, distillation from the original
model, and block-local recovery alone and before either, at equal training tokens (issue 24).

The default's blocks at about 20 and 30 % (its choice on 32 × 256 docstring tokens, seed 0, from
benchmarks/results/robustness-<model>.json) are removed; each row heals a fresh copy of that
pruned model on the docstrings (LoRA rank 8 on every projection, lr 2e-4, windows of 256 tokens,
4 per step) and is judged on held-out fortunes and paragraphs. Gap closed = (plain - healed) /
(plain - dense).

    python benchmarks/recovery.py --models smollm2-135m --steps 40

Results: benchmarks/results/recovery-<model>.json (resumed on the next start) and recovery.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from quality import MODELS, RESULTS, gather_results
from sglp_llm.data import FORTUNES, SELF_GENERATED, STDLIB_DOCS
from sglp_llm.evaluation.evaluate import load_eval_texts, perplexity
from sglp_llm.recovery.block_recovery import recover_blocks
from sglp_llm.heal import HealConfig, heal, training_batches
from sglp_llm.model.loading import load_model
from sglp_llm.model.rewrite import removing_blocks

SOURCES = {"fortunes": FORTUNES, "paragraphs": None}  # None: the built-in evaluation text
RATIOS = (0.2, 0.3)
# the rate of the block-local rows that name none: the tool's `recover_learning_rate` when they were
# measured (the default is 3e-4 since 2026-12-07, chosen by the rows "block-local at lr ...")
BLOCK_LOCAL_LR = 3e-3
# row -> (block-local recovery first at this rate, or None: none; HealConfig settings beyond the
# common ones, or None: no healing)
ROWS = {
    "next-token LoRA": (None, {"teacher": "none"}),
    "KD LoRA": (None, {}),
    "KD + hidden states": (None, {"hidden_weight": 1.0}),
    "KD LoRA at lr 1e-3": (None, {"learning_rate": 1e-3}),
    "next-token LoRA at lr 1e-3": (None, {"teacher": "none", "learning_rate": 1e-3}),
    "KD LoRA at lr 2e-3": (None, {"learning_rate": 2e-3}),
    "KD LoRA rank 32 at lr 1e-3": (None, {"learning_rate": 1e-3, "rank": 32, "alpha": 64.0}),
    "KD LoRA at lr 2e-3 on a cosine": (None, {"learning_rate": 2e-3, "lr_schedule": "cosine", "warmup_ratio": 0.05}),
    "KD LoRA rank 32 at lr 2e-3 on a cosine": (None, {"learning_rate": 2e-3, "rank": 32, "alpha": 64.0,
                                                   "lr_schedule": "cosine", "warmup_ratio": 0.05}),
    "KD LoRA + full blocks at the gaps": (None, {"learning_rate": 1e-3, "full_blocks": "gaps"}),
    # KD on windows the teacher samples itself (builtin:self-generated) instead of the docstrings
    "KD LoRA at lr 1e-3 on the teacher's samples": (None, {"learning_rate": 1e-3, "dataset": SELF_GENERATED}),
    # the same with another seed (its samples and LoRA's start), drawn by sglp's own nucleus draw
    # (passes/sampling.NucleusDraw; the row above was drawn by generate's top-p): how far one run is from another
    "KD LoRA at lr 1e-3 on the teacher's samples at seed 1": (None, {"learning_rate": 1e-3, "dataset": SELF_GENERATED,
                                                                    "seed": 1}),
    "block-local": (BLOCK_LOCAL_LR, None),
    "block-local + next-token LoRA": (BLOCK_LOCAL_LR, {"teacher": "none"}),
    "block-local + KD LoRA": (BLOCK_LOCAL_LR, {}),
    "block-local + KD LoRA at lr 1e-3": (BLOCK_LOCAL_LR, {"learning_rate": 1e-3}),
    # on Gemma-3-270M the default rate then (3e-3) made the held-out perplexity worse than the plain drop
    "block-local at lr 1e-3": (1e-3, None),
    "block-local at lr 3e-4": (3e-4, None),
    "block-local at lr 1e-4": (1e-4, None),
    "block-local at lr 3e-4 + KD LoRA at lr 1e-3": (3e-4, {"learning_rate": 1e-3}),
}
# every row's LoRA rate unless it names one: heal's default when the rows were first measured (now
# 1e-3 when distilling: the rows "at lr 1e-3")
LEARNING_RATE = 2e-4


def _held_out(model, tokenizer, texts) -> dict[str, float]:
    return {name: perplexity(model, tokenizer, t, max_length=256, batch_size=8, progress=False)["perplexity"]
            for name, (t, _) in texts.items()}


def _block_local(teacher, tokenizer, dropped: list[int], config: HealConfig, learning_rate: float) -> tuple[torch.nn.Module, float]:
    """The pruned model with block-local recovery (sglp_llm.recovery.block_recovery) on the same windows
    healing trains on, each trained block seeing each window once; (model, seconds)."""
    model = copy.deepcopy(teacher)
    batches, _, _ = training_batches(model, tokenizer, config)
    recovery = recover_blocks(model, batches, dropped, steps=config.steps, learning_rate=learning_rate, progress=False)
    removing_blocks(model, dropped)
    return model, recovery.seconds


def _update(out: Path, change) -> dict:
    """Apply `change` to the results file as it is now and write it back: two runs on other
    cells can share the file."""
    result = json.loads(out.read_text()) if out.is_file() else {"cells": {}}
    change(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_model(name: str, steps: list[int], rows: list[str], ratios: list[float], eval_max_texts: int) -> None:
    out = RESULTS / f"recovery-{name}.json"
    loaded = load_model(name, dtype="float32")
    teacher, tokenizer = loaded.model, loaded.tokenizer
    robustness = json.loads((RESULTS / f"robustness-{name}.json").read_text())
    # a new cell's blocks: the whole-head default's choice as recorded then
    order = robustness["runs"]["256|0|whole-head-recorded"]["order"]
    num_blocks = robustness["num_blocks"]
    texts = {key: load_eval_texts(source, max_texts=eval_max_texts) for key, source in SOURCES.items()}
    result = _update(out, lambda r: r.update(model=loaded.name, num_blocks=num_blocks, eval_max_texts=eval_max_texts,
                                             sources={key: description for key, (_, description) in texts.items()}))
    if "dense" not in result:
        dense = _held_out(teacher, tokenizer, texts)
        _update(out, lambda r: r.setdefault("dense", dense))
    for ratio in ratios:
        drop = round(ratio * num_blocks)
        # a cell measured before keeps its blocks (an earlier default's choice): its rows compare on the same model
        cell = _update(out, lambda r: r["cells"].setdefault(str(drop), {"dropped": sorted(order[:drop])}))["cells"][str(drop)]
        dropped = cell["dropped"]
        pruned = copy.deepcopy(teacher)
        removing_blocks(pruned, dropped)
        if "plain" not in cell:
            plain = _held_out(pruned, tokenizer, texts)
            _update(out, lambda r: r["cells"][str(drop)].setdefault("plain", plain))
        for n_steps in steps:
            for row in rows:
                key = f"{row} | {n_steps}"
                if key in _update(out, lambda r: None)["cells"][str(drop)]:
                    continue
                recover, settings = ROWS[row]
                config = HealConfig(steps=n_steps, batch_size=4, seq_len=256, eval_max_texts=1,
                                    **{"dataset": STDLIB_DOCS, "learning_rate": LEARNING_RATE, **(settings or {})})
                student, seconds, tokens = copy.deepcopy(pruned), 0.0, 0
                if recover is not None:
                    student, seconds = _block_local(teacher, tokenizer, dropped, config, recover)
                    tokens = n_steps * config.batch_size * config.seq_len
                started = time.perf_counter()
                if settings is not None:
                    healed = heal(student, tokenizer, config, teacher=teacher, teacher_tokenizer=tokenizer, progress=False)
                    student, seconds, tokens = healed.model, seconds + healed.report["seconds"], tokens + healed.report["tokens"]
                # the whole call's: the training text's preparation (sampling it) and both held-out measurements too
                heal_wall = time.perf_counter() - started
                row_result = {**_held_out(student, tokenizer, texts), "seconds": seconds, "tokens": tokens,
                              "threads": torch.get_num_threads(), "heal_wall_seconds": heal_wall}
                _update(out, lambda r: r["cells"][str(drop)].__setitem__(key, row_result))
                print(name, drop, key, row_result, flush=True)
                del student


def markdown(result: dict) -> str:
    sources = list(result["sources"])
    dense = result["dense"]
    lines = [
        f"## {result['model']}", "",
        f"- blocks: {result['num_blocks']}; the first {result['eval_max_texts']} texts of each held-out source; "
        "time: the training's alone, at the torch threads shown (one each when two runs share the 2 cores)",
        *(f"- held-out `{key}`: {description}" for key, description in result["sources"].items()),
        "- dense: " + ", ".join(f"{key} {dense[key]:.1f}" for key in sources),
        "- training: the standard-library docstrings (unless the row says), windows of 256 tokens, 4 per step, LoRA rank 8 on every "
        f"projection, lr {LEARNING_RATE:g} unless the row says; KD: KL to the original model at temperature 1, the teacher beside the student; "
        f"block-local: each kept block before a removed run trained (all its weights, AdamW at lr {BLOCK_LOCAL_LR}) on "
        "those windows, one step per 4 windows, towards the original's state after the run; 'block-local +' "
        "rows count both trainings' tokens and time",
        "",
    ]
    for drop, cell in result["cells"].items():
        plain = cell["plain"]
        lines += [f"### Drop {drop}: blocks {cell['dropped']}", "",
                  "| row | steps (tokens) | " + " | ".join(f"{s} (gap closed)" for s in sources) + " | time |",
                  "|---|---|" + "---|" * len(sources) + "---|",
                  "| plain drop | – | " + " | ".join(f"{plain[s]:.1f}" for s in sources) + " | – |"]
        keys = [key for key in cell if key not in ("dropped", "plain")]
        order = list(ROWS)
        for key in sorted(keys, key=lambda k: (int(k.split(" | ")[1]), order.index(k.split(" | ")[0]))):
            row = cell[key]
            name, steps = key.split(" | ")
            gaps = [(plain[s] - row[s]) / (plain[s] - dense[s]) for s in sources]
            lines.append(f"| {name} | {steps} ({row['tokens']:,}) | "
                         + " | ".join(f"{row[s]:.1f} ({g:.0%})" for s, g in zip(sources, gaps))
                         + f" | {row['seconds']:.0f} s ({row['threads']} thr.){_preparation(row)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _preparation(row: dict) -> str:
    """The whole heal call's time where preparing the training text (sampling it) took a tenth more."""
    wall = row.get("heal_wall_seconds", 0.0)
    return f"; {wall:.0f} s with sampling the text" if wall > 1.1 * row["seconds"] else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", default="40", help="comma-separated step counts")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated fractions of blocks dropped")
    parser.add_argument("--eval-max-texts", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        run_model(name, [int(s) for s in args.steps.split(",")], args.rows.split(","),
                  [float(r) for r in args.ratios.split(",")], args.eval_max_texts)
    gather_results("recovery", "Recovery after the default's drop: next-token LoRA vs distillation vs block-local "
                   "(benchmarks/recovery.py)", markdown)


if __name__ == "__main__":
    main()
