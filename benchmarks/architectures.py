"""Every causal-LM architecture of the installed transformers, pruned and checked.

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` a tiny random model (6 blocks,
hidden 64; `tiny_architectures.py`) is pruned by 2 blocks with the default method and saved, then
checked here independently of sglp_llm.output.verify: the saved folder, reloaded with plain
`from_pretrained`, must give the logits and greedy tokens (with the KV cache) of the original
model with the dropped blocks made identities. Each type is

- exact: pruned, saved and equal to the original with the blocks skipped;
- refused: sglp-llm declined with a message (the first line is kept);
- crash: an exception that is not one of sglp-llm's messages;
- wrong: written, but not equal (the outcome that must never happen);
- not built: no tiny model of the type can be made here (reason given).

    python benchmarks/architectures.py                # every type -> results/architectures.md
    python benchmarks/architectures.py llama jamba    # some types, printed only
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_architectures import CannotBuild, causal_lm_types, image_text_types, tiny_causal_lm  # noqa: E402

from sglp_llm import SGLPConfig  # noqa: E402
from sglp_llm.api import prune  # noqa: E402
from sglp_llm.model.auto_class import auto_model_class  # noqa: E402
from sglp_llm.model.blocks import UnsupportedModelError, find_decoder_blocks  # noqa: E402
from sglp_llm.config import ConfigError  # noqa: E402
from sglp_llm.model.rewrite import RewriteError  # noqa: E402
from sglp_llm.output.verify import VerificationError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFUSALS = (RewriteError, UnsupportedModelError, VerificationError, ConfigError)
NUM_BLOCKS, DROP, SEQ_LEN = 6, 2, 24
TIMEOUT_S = 120


@dataclass
class Outcome:
    model_type: str
    status: str  # exact | refused | crash | wrong | not built
    detail: str = ""
    dropped: list[int] | None = None
    seconds: float = 0.0


def _passthrough(layers, dropped):
    """Forward hooks that make the dropped blocks identities (the independent reference)."""

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, (tuple, list)):
            return type(output)([hidden, *output[1:]])
        return hidden

    return [layers[i].register_forward_hook(hook, with_kwargs=True) for i in dropped]


def _outputs(model, input_ids):
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        tokens = model.generate(
            input_ids=input_ids[:1], attention_mask=torch.ones_like(input_ids[:1]), max_new_tokens=3,
            min_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0,
        )
    return logits, tokens


def _table_rows(model) -> list[int]:
    """The rows of the model's input and output embedding tables (those it has)."""
    rows = []
    for table in (model.get_input_embeddings, model.get_output_embeddings):
        try:
            weight = getattr(table(), "weight", None)
        except NotImplementedError:  # a model without such a table
            continue
        if isinstance(weight, torch.Tensor):
            rows.append(weight.shape[0])
    return rows


def classify(model_type: str) -> Outcome:
    """Prune a tiny `model_type` and say what became of it."""
    started = time.perf_counter()
    try:
        model = tiny_causal_lm(model_type, num_blocks=NUM_BLOCKS, hidden=64)
    except CannotBuild as reason:
        return Outcome(model_type, "not built", str(reason))
    # token ids every table of the model accepts (input and output vocabularies can differ)
    vocab = min([*_table_rows(model), getattr(model.config.get_text_config(), "vocab_size", None) or 128])
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(3, vocab, (2, SEQ_LEN), generator=generator),
         "attention_mask": torch.ones(2, SEQ_LEN, dtype=torch.long)}
        for _ in range(2)
    ]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = SGLPConfig(drop=DROP, seq_len=SEQ_LEN, n_samples=4, batch_size=2)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = prune(model, batches, config, progress=False)
            result.save_pretrained(Path(tmp) / "pruned")
        except REFUSALS as error:
            return Outcome(model_type, "refused", str(error).splitlines()[0], seconds=time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 - the sweep records every failure
            return Outcome(model_type, "crash", f"{type(error).__name__}: {error}".splitlines()[0][:300],
                           seconds=time.perf_counter() - started)
        dropped = result.plan.dropped
        # as a user would load it: the Auto class, or the model's own where Auto lacks its config
        auto = auto_model_class(model.config)
        reloaded = (auto if type(model.config) in auto._model_mapping else type(model)).from_pretrained(
            Path(tmp) / "pruned", attn_implementation=model.config._attn_implementation
        ).eval()
    # the original, rebuilt from its own config and weights, with the dropped blocks as identities
    from sglp_llm.model.rewrite import SGLP_CONFIG_KEY

    fresh = tiny_causal_lm(model_type, num_blocks=NUM_BLOCKS, hidden=64)
    fresh.load_state_dict(original)
    assert not hasattr(fresh.config.get_text_config(), SGLP_CONFIG_KEY)
    handles = _passthrough(find_decoder_blocks(fresh).layers, dropped)
    probe = batches[0]["input_ids"]
    want_logits, want_tokens = _outputs(fresh, probe)
    for handle in handles:
        handle.remove()
    got_logits, got_tokens = _outputs(reloaded, probe)
    difference = (got_logits - want_logits).abs().max().item()
    scale = want_logits.abs().max().item() or 1.0
    exact = difference <= 1e-4 * scale and torch.equal(got_tokens, want_tokens)
    return Outcome(
        model_type, "exact" if exact else "wrong",
        "" if exact else f"logits differ by {difference:.3g} (largest {scale:.3g}); tokens equal: "
        f"{torch.equal(got_tokens, want_tokens)}",
        dropped, time.perf_counter() - started,
    )


def _with_timeout(model_type: str) -> Outcome:
    def expire(*_):
        raise TimeoutError(f"over {TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT_S)
    try:
        return classify(model_type)
    except Exception as error:  # noqa: BLE001 - e.g. the timeout, or the reference itself failing
        return Outcome(model_type, "crash", f"{type(error).__name__}: {error}".splitlines()[0][:300])
    finally:
        signal.alarm(0)


def write_markdown(outcomes: list[Outcome], path: Path, image_text: bool = False) -> None:
    import transformers

    counts = {s: sum(o.status == s for o in outcomes) for s in ("exact", "refused", "crash", "wrong", "not built")}
    which = ("`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES` that `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` leaves out (models "
             "that also read images; their text stack is pruned, on text)" if image_text
             else "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`")
    lines = [
        "# Architecture sweep" + (": models that also read images" if image_text else ""),
        "",
        f"Every model type of {which} in transformers {transformers.__version__} "
        f"({len(outcomes)} types): a tiny random model ({NUM_BLOCKS} blocks, hidden 64) pruned by {DROP} blocks "
        "with the default method and saved by sglp-llm (verification on), then checked independently: the "
        "saved folder reloaded with `from_pretrained` against the original with the dropped blocks made "
        "identities (logits, and greedy tokens with the KV cache, on text). Made by "
        f"`python benchmarks/architectures.py{' --image-text' if image_text else ''}`.",
        "",
        "| outcome | types |",
        "|---|---|",
        *(f"| {status} | {count} |" for status, count in counts.items()),
        "",
        "| model type | outcome | dropped | why |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        why = o.detail.replace("|", "\\|")
        lines.append(f"| `{o.model_type}` | {o.status} | {o.dropped or ''} | {why} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all, written to results/)")
    parser.add_argument("--image-text", action="store_true",
                        help="the types only AutoModelForImageTextToText builds -> results/architectures-image-text.*")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    outcomes = []
    for model_type in args.types or (image_text_types() if args.image_text else causal_lm_types()):
        outcome = _with_timeout(model_type)
        print(f"{outcome.model_type:32} {outcome.status:10} {outcome.seconds:6.1f}s {outcome.detail[:150]}", flush=True)
        outcomes.append(outcome)
    if not args.types:
        RESULTS.mkdir(exist_ok=True)
        name = "architectures-image-text" if args.image_text else "architectures"
        (RESULTS / f"{name}.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
        write_markdown(outcomes, RESULTS / f"{name}.md", args.image_text)
    return int(any(o.status in ("crash", "wrong") for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
