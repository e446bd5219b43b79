"""How SGLP's default choice depends on the calibration text: two sources times three token
budgets on SmolLM2-135M, at about 20 % of the blocks, held-out perplexity on fortunes.

Sources: the standard-library docstrings (the built-in default) and the Python language
reference (the `pydoc_data.topics` prose every Python install ships), both different from the
held-out fortunes. Budgets: 8, 16 and 32 windows of 256 tokens.

    python benchmarks/calibration.py

Results: benchmarks/results/calibration-smollm2-135m/compare.{json,md,png} (resumable).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sglp_llm.compare import Comparison, compare
from sglp_llm.config import SGLPConfig
from sglp_llm.data import FORTUNES, STDLIB_DOCS
from sglp_llm.model.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (8, 16, 32)  # windows of 256 tokens
SEQ_LEN = 256


def language_reference(folder: Path) -> Path:
    """The Python language reference's topics as a JSONL file of {"text": ...} records."""
    from pydoc_data.topics import topics

    path = folder / "python-language-reference.jsonl"
    path.write_text("".join(json.dumps({"text": topics[name]}) + "\n" for name in sorted(topics)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--eval-max-texts", type=int, default=150)
    args = parser.parse_args()
    out = RESULTS / f"calibration-{args.model}"
    resume = Comparison.load(out) if (out / "compare.json").is_file() else None
    loaded = load_model(args.model, dtype="float32")
    folder = Path(tempfile.gettempdir()) / "sglp-llm-benchmarks"  # a stable path: runs resume
    folder.mkdir(exist_ok=True)
    sources = {"docs": STDLIB_DOCS, "reference": str(language_reference(folder))}
    # the selection settings spelled out, so the cells keep their meaning if the defaults change
    selection = {"scoring": "loss", "groups": True, "allocation": "loss", "loss_candidates": 8, "loss_lazy": True,
                 "loss_tokens": 1024, "auto_k": "reference", "loss_screen_samples": 0, "loss_bound": "stale"}
    variants = {
        f"sglp-{name}-{n}x{SEQ_LEN}": {**selection, "dataset": source, "n_samples": n}
        for name, source in sources.items() for n in BUDGETS
    }
    base = SGLPConfig(drop=1, dataset=STDLIB_DOCS, seq_len=SEQ_LEN, n_samples=16, batch_size=4, seed=0)
    compare(
        loaded.model, loaded.tokenizer, base, drops=[args.drop], methods=["block-influence"],
        variants=variants, eval_source=FORTUNES, eval_max_texts=args.eval_max_texts,
        eval_max_length=256, eval_batch_size=8, model_name=loaded.name, resume=resume,
        on_result=lambda c: c.save(out),
    ).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
