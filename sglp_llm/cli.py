"""`sglp-llm` command line: `prune` writes a shallower model, `analyze` prints the plan, `eval` scores
one, `compare` measures every method at several drop counts, `heal` fine-tunes a pruned model with
LoRA.

Settings come from, in increasing priority: SGLPConfig defaults, a YAML recipe (`--recipe`),
and the flags given on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from .config import (
    ALLOCATIONS, COMPENSATION_FITS, COMPENSATIONS, GRADIENT_SCORES, HIDDEN_STATES, LOSS_BOUNDS, LOSS_OBJECTIVES, LOSS_SCREENS, LOSS_TIES, METHODS, OFFLOAD_MODES, RECOVERIES, SCORING_MODES, SEGMENT_FEATURES, ConfigError,
    SGLPConfig,
)
from .explain import stages
from .data import FORTUNES, PYTHON_REFERENCE, SELF_GENERATED, STDLIB_DOCS

# recipe keys that describe the run rather than the SGLP settings
RUN_KEYS = (
    "model", "dtype", "device_map", "max_memory", "offload_folder", "blocks_on_disk", "output", "trust_remote_code",
)
# recipe sections: SGLPConfig settings, and heal.HealConfig settings (`prune --heal`, `heal`)
SECTIONS = ("sglp", "heal")
# the run keys that also apply to `heal`, whose model and output are its own arguments
HEAL_RUN_KEYS = ("dtype", "device_map", "trust_remote_code")
# `compare` scores the first N held-out texts: enough for stable perplexities, and quick enough to
# repeat for every method and drop count
DEFAULT_COMPARE_TEXTS = 500


# the options `prune --help` and `analyze --help` show; `--help-all` shows every option
EVERYDAY = {
    "--model", "--dtype", "--device-map", "--recipe", "--trust-remote-code", "--drop", "--ratio", "--method",
    "--dataset", "--dataset-config", "--split", "--text-column", "--seq-len", "--n-samples", "--seed",
    "--offload", "--blocks-on-disk", "--output", "--overwrite", "--push-to-hub", "--public", "--eval-dataset",
    "--eval-tasks", "--heal", "--report", "--no-progress", "--plan-memory", "--plan-time", "--help-all",
}


class _HelpAll(argparse.Action):
    """`--help-all`: the subcommand's help with every option, the research settings included."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        build_parser(show_all=True)._subparsers._group_actions[0].choices[parser.prog.split()[-1]].print_help()
        parser.exit()


def _everyday_help(parser: argparse.ArgumentParser) -> None:
    """Hide every option outside EVERYDAY from `--help` (they all still work) and say so."""
    hidden = 0
    for action in parser._actions:
        if action.option_strings and not set(action.option_strings) & (EVERYDAY | {"-h", "--help"}):
            action.help = argparse.SUPPRESS
            hidden += 1
    parser.epilog = (f"{hidden} more options (memory, the loss check's research settings, compensation, recovery, "
                     "healing settings, evaluation details): --help-all")


def _add_model(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="Hub id, local directory or .gguf file (default: the packaged SmolLM2-135M)")
    model.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default: auto)")
    model.add_argument("--device-map", help="accelerate device map: auto, balanced, balanced_low_0, sequential, a "
                                            "device (cpu, cuda:1), or a JSON module->device mapping (inline or a "
                                            ".json file; \"disk\" offloads to --offload-folder)")
    model.add_argument("--max-memory", help="memory per device for the device map, e.g. 0=20GiB,1=20GiB,cpu=60GiB (or JSON)")
    model.add_argument("--offload-folder", help="folder for the weights the device map offloads to disk")
    model.add_argument("--blocks-on-disk", action="store_true", default=None,
                       help="with --offload sequential: leave the decoder blocks of a local safetensors "
                            "model on disk and read each when it runs, for models larger than memory")
    model.add_argument("--trust-remote-code", action="store_true", default=None,
                       help="allow the model repository's own Python code to run (off by default)")
    model.add_argument("--layers-path", help="dotted path to the decoder blocks' ModuleList, e.g. model.layers")
    model.add_argument("--recipe", type=Path, help="YAML recipe; flags given here override it")


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("calibration data")
    data.add_argument("--dataset", nargs="+", type=str,
                      help=f"Hub dataset name, local file/directory, {STDLIB_DOCS}, {PYTHON_REFERENCE}, {FORTUNES} "
                           f"or {SELF_GENERATED} (text sampled from the model itself) (default: {SELF_GENERATED}, the "
                           f"choice that held best on text nobody calibrated on; {STDLIB_DOCS} when the model runs one "
                           "block at a time or from a device map's disk); several: their windows mixed in equal shares")
    data.add_argument("--dataset-config", help="dataset configuration name")
    data.add_argument("--split", dest="dataset_split", help="dataset split (default: train)")
    data.add_argument("--text-column", help="column holding the text (default: text)")
    data.add_argument("--seq-len", type=int, help="tokens per calibration window")
    data.add_argument("--n-samples", type=int, help="number of calibration windows")
    data.add_argument("--batch-size", type=int, help="windows per forward/backward pass")
    data.add_argument("--seed", type=int, help="seed for window selection and CKA minibatches")
    statistics = parser.add_argument_group("statistics pass (memory and long runs; the results do not change)")
    statistics.add_argument("--gradient-checkpointing", action="store_true", default=None,
                            help="recompute block activations in the gradient-score backward: less memory, one more forward")
    statistics.add_argument("--checkpoint-dir", help="save the pass's sums here as it goes; a rerun resumes from them")
    statistics.add_argument("--checkpoint-every", type=int, help="calibration batches between saves (default: 1)")


def _add_method_settings(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    method = parser.add_argument_group("method")
    method.add_argument("--scoring", choices=SCORING_MODES,
                        help="how each group gives up blocks: loss (the gradient score ranks, the calibration loss "
                             "confirms; default), block (the gradient score alone) or subset (the paper's search)")
    method.add_argument("--gradient-score", choices=GRADIENT_SCORES,
                        help="the score from one backward that ranks each group's blocks: taylor (-dL/dα of a gate on "
                             "the block), fisher (that gate's second moment) or gradnorm (the paper's weight-gradient norm)")
    method.add_argument("--segment-feature", choices=SEGMENT_FEATURES, help="CKA column sums or CKA rows")
    method.add_argument("--compensation", choices=COMPENSATIONS,
                        help="fold a map fitted on the calibration tokens (least_squares: d x d, ReplaceMe; cosine: "
                             "its cosine-distance variant; rescale: per channel) for each removed run into the "
                             "block before it (default none: see benchmarks/results/compensation.md)")
    method.add_argument("--compensation-ridge", type=float, help="ridge of the compensation's least squares")
    method.add_argument("--compensation-fit", choices=COMPENSATION_FITS,
                        help="fit each run's map on the original network (default) or run by run on the network "
                             "pruned and compensated so far (pruned)")
    method.add_argument("--compensation-aware", action="store_true", default=None,
                        help="the loss check (or SLEB) measures each candidate removal with its compensation "
                             "fitted and applied")
    method.add_argument("--recover", choices=RECOVERIES,
                        help="after the removal, train each kept block that feeds a removed run to give the original's "
                             "state after the run, one block at a time on the calibration tokens (blocks; default "
                             "none: see benchmarks/results/recovery.md)")
    method.add_argument("--recover-steps", type=int, help="AdamW steps per trained block (one calibration batch each)")
    method.add_argument("--recover-learning-rate", type=float, help="learning rate of the block-local recovery (default 3e-4: 3e-3 made Gemma-3-270M worse than the plain drop)")
    method.add_argument("--groups", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the choice to the Fisher groups of CKA-similar blocks (default: on for "
                             "--scoring block/subset, off for the loss check, whose choices they never changed "
                             "in benchmarks/results/ablation.md)")
    method.add_argument("--num-segments", type=int, help="fixed number of segments (default: automatic)")
    method.add_argument("--cka-minibatch-tokens", type=int, help="tokens per CKA minibatch")
    method.add_argument("--cka-skip-sinks", action="store_true", default=None,
                        help="leave attention sinks out of CKA: each sequence's first token and tokens whose "
                             "norm is over 10x the minibatch median at some block output")
    method.add_argument("--offload", choices=OFFLOAD_MODES,
                        help="sequential: one decoder block on the device at a time (default: none)")
    method.add_argument("--onload-device", help="with --offload sequential: where each block runs, e.g. cuda:0 "
                                                "(default: the input embeddings' device)")
    method.add_argument("--hidden-states", choices=HIDDEN_STATES,
                        help="with --offload sequential: keep every block's hidden states in memory or on disk "
                             "(default auto: on disk when they would take over half the available memory)")
    method.add_argument("--hidden-states-dir", help="where --hidden-states disk writes its temporary folder "
                                                    "(default: the system's temporary folder)")
    method.add_argument("--allocation", choices=ALLOCATIONS,
                        help="drops per segment: by the loss check (auto with --scoring loss), size or redundancy")
    method.add_argument("--loss-candidates", type=_count_or_all,
                        help="lowest-scored blocks per group the loss check tries; 'all': every block, no backward")
    method.add_argument("--loss-tokens", type=int,
                        help="calibration tokens each loss-check candidate is scored on, whatever the batch size "
                             "(default 2048)")
    method.add_argument("--loss-positions", type=float,
                        help="share of each loss window's positions whose loss the head scores (seeded, spread "
                             "evenly; the blocks still run on all): cheaper with a large vocabulary (default 1)")
    method.add_argument("--loss-vocabulary", type=int,
                        help="K > 0: the head scores only each sequence's K likeliest tokens per position under the "
                             "original model, its next tokens and a weighted sample of the rest (an estimate of the "
                             "NLL from a few of the head's columns: cheaper with a large vocabulary, as good held out); "
                             "0: all; default: 32 where the head is a plain linear layer over 16384 tokens or more, else 0")
    method.add_argument("--loss-objective", choices=LOSS_OBJECTIVES,
                        help="what a removal's loss is: nll (the calibration text's next tokens, SLEB's) or kl "
                             "(the divergence from the original model's next-token distribution)")
    method.add_argument("--loss-beam", type=int,
                        help="follow the K best removal sets instead of one, and choose among them on the next "
                             "--loss-tokens calibration tokens, held back from the search (default 1: greedy)")
    method.add_argument("--loss-confirm", type=int,
                        help="at each removal, measure the loss check's K best candidates on the next --loss-tokens "
                             "calibration tokens, held back from the search, and remove the best there (default 1: off)")
    method.add_argument("--loss-ties", choices=LOSS_TIES,
                        help="how a removal is chosen among candidates whose losses differ by less than one standard "
                             "error over the loss sequences: run-then-block-influence (default: a block bordering a "
                             "removed one first, then the one that changes its input least in the original network), "
                             "block-influence (that alone) or none (the lowest loss)")
    method.add_argument("--decide-among", nargs="+", choices=[m for m in METHODS if m != "sglp"], metavar="PEER",
                        help="peers whose choices compete with SGLP's (e.g. block-influence angular): the set "
                             "with the lowest calibration loss on the tokens after --loss-tokens goes "
                             "(benchmarks/results/pool-decision.md; off by default)")
    method.add_argument("--loss-bound", choices=LOSS_BOUNDS,
                        help="the loss check's lazy bound: local (default), stale or marginal")
    method.add_argument("--loss-screen", choices=LOSS_SCREENS,
                        help="the loss check's first estimates: sequences (the loss on --loss-screen-samples "
                             "sequences; default) or taylor (the loss plus the Taylor gate score)")
    method.add_argument("--loss-screen-samples", type=int,
                        help="rank the loss check's first candidates on this many sequences first (0: off; default 1)")
    method.add_argument("--loss-risk", type=float,
                        help="rank the loss check's candidates by their loss plus this many standard errors of their "
                             "increase over the loss sequences (default 0: the loss alone)")
    method.add_argument("--loss-tie-errors", type=float,
                        help="how many standard errors of the best removal's increase count as a near-tie that "
                             "--loss-ties settles (default 1)")
    method.add_argument("--loss-screen-errors", type=float,
                        help="lower each screened estimate by this many of its expected errors before it may leave "
                             "a candidate unmeasured (default 1; 0: the estimate as it is)")
    method.add_argument("--max-candidates", type=int, help="cap on keep-sets scored per segment (subset search)")
    method.add_argument("--sleb-batches", type=int,
                        help="calibration batches each SLEB candidate is scored on (default: all)")
    method.add_argument("--protect-first", type=int, help="never drop the first N blocks (default: 1)")
    method.add_argument("--protect-last", type=int, help="never drop the last N blocks (default: 1)")
    return method


def _count_or_all(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    """The options of `prune` and `analyze`: one model, one method, one drop count."""
    _add_model(parser)
    how_much = parser.add_argument_group("how much to prune").add_mutually_exclusive_group()
    how_much.add_argument("--drop", type=int, help="number of decoder blocks to remove")
    how_much.add_argument("--ratio", type=float, help="fraction of decoder blocks to remove")
    _add_calibration(parser)
    _add_method_settings(parser).add_argument(
        "--method", choices=METHODS, help="SGLP or a peer baseline (default: sglp)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                        help="skip checking that the pruned model (and the saved folder, reloaded) computes "
                             "what the original computes with the dropped blocks skipped; by default a "
                             "mismatch writes nothing, and a trial rewrite is checked before the analysis")
    parser.add_argument("--no-stability-check", dest="stability_check", action="store_false", default=None,
                        help="skip analysing each half of the calibration sequences as well (by default the report "
                             "says how far the halves' choices agree, and a warning says when they mostly differ)")
    parser.add_argument("--report", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--help-all", action=_HelpAll, help="show every option, not only the everyday ones")


def _add_held_out(
    parser: argparse.ArgumentParser, title: str, dataset_help: str, max_texts: int | None = None
) -> argparse._ArgumentGroup:
    """Where held-out text for perplexity comes from (`prune --eval-*`, `compare --eval-*`)."""
    group = parser.add_argument_group(title)
    group.add_argument("--eval-dataset", help=dataset_help)
    group.add_argument("--eval-dataset-config", help="its dataset configuration name")
    group.add_argument("--eval-split", default="train", help="its split (default: train)")
    group.add_argument("--eval-text-column", default="text", help="its text column (default: text)")
    group.add_argument("--eval-max-texts", type=int, default=max_texts,
                       help=f"score only its first N texts (default: {max_texts or 'all'})")
    return group


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglp-llm",
        description="Depth-prune Hugging Face causal LMs (SGLP's stages, SLEB's loss criterion). The default run: "
        + "; ".join(stages(SGLPConfig(drop=1).to_dict())) + ".",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="analyze a model and write the pruned model")
    _add_common(prune)
    prune.add_argument("--output", type=Path, help="output directory for the pruned model")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    prune.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the saved folder to this Hub repo")
    prune.add_argument("--public", action="store_true", help="make the Hub repo public (private by default)")
    _add_held_out(
        prune, "evaluation of the dense and the pruned model (in memory; into the report and card)",
        "perplexity on this held-out text (same kinds as --dataset), before and after pruning",
    ).add_argument("--eval-tasks", help="comma-separated lm-eval tasks to run before and after pruning")
    prune.add_argument("--eval-speed", action="store_true",
                       help="also time greedy generation (prefill and decode tokens/s, median of 5) and count "
                            "parameters, before and after pruning, into the report and card")
    healing = prune.add_argument_group("healing: LoRA after pruning (settings also from the recipe's `heal:` section)")
    healing.add_argument("--heal", action="store_true",
                         help="fine-tune the pruned model with LoRA (pip install 'sglp-llm[heal]') and save it merged")
    _add_heal_settings(healing, "heal-")
    analyze = sub.add_parser("analyze", help="print which blocks would be dropped, write nothing")
    _add_common(analyze)
    analyze.add_argument("--plan-memory", action="store_true",
                         help="print the predicted peak memory per device of this run (and of writing the "
                              "pruned model) from the model's config alone, without loading any weight")
    analyze.add_argument("--plan-time", action="store_true",
                         help="print the predicted compute time of this analysis, from the model's config and a "
                              "throughput measured in a few seconds on a one-block copy with random weights "
                              "(or --throughput), without loading any weight")
    analyze.add_argument("--throughput", type=float, metavar="TFLOPS",
                         help="with --plan-time: the sustained TFLOP/s of the device that will run it, instead of measuring")
    if not show_all:
        _everyday_help(prune)
        _everyday_help(analyze)
    _add_eval(sub.add_parser("eval", help="perplexity and lm-eval tasks of a (pruned) model"))
    _add_compare(sub.add_parser(
        "compare", help="every method at several drop counts: held-out perplexity, analysis time, speed"
    ))
    _add_heal(sub.add_parser(
        "heal", help="fine-tune a (pruned) model with LoRA; write the adapter or the merged model"
    ))
    return parser


def _add_model_to_read(parser: argparse.ArgumentParser, help: str) -> None:
    """The model `eval` and `heal` read: positional, or --model as `prune` and `analyze` take it."""
    parser.add_argument("model", nargs="?", help=help)
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same as the positional MODEL")


def _model_named_once(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve `eval`/`heal`'s model from the positional or --model, refusing none or two."""
    if not hasattr(args, "model_flag"):
        return
    named = [m for m in (args.model, args.model_flag) if m is not None]
    if not named:
        parser.error(f"{args.command} needs the model to read: sglp-llm {args.command} MODEL (or --model MODEL)")
    if len(set(named)) > 1:
        parser.error(f"{args.command} got two models ({named[0]} and {named[1]}): give it one, positional or --model")
    args.model = named[0]


def _add_heal(parser: argparse.ArgumentParser) -> None:
    _add_model_to_read(parser, "model directory (e.g. written by `prune`), .gguf file or Hub id; only read")
    model = parser.add_argument_group("model")
    model.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default: auto)")
    model.add_argument("--device-map", help="accelerate device map: auto, balanced, sequential, cpu, ...")
    model.add_argument("--trust-remote-code", action="store_true", default=None,
                       help="allow the model repository's own Python code to run (off by default)")
    model.add_argument("--layers-path", help="dotted path to the decoder blocks' ModuleList, e.g. model.layers")
    model.add_argument("--recipe", type=Path,
                       help="YAML recipe: its `heal:` section and dtype/device_map; flags given here override it")
    _add_heal_settings(parser.add_argument_group("healing settings"), "")
    output = parser.add_argument_group("output")
    output.add_argument("--output", type=Path, required=True,
                        help="folder for the adapter (or, with --merge, the merged model and adapter/)")
    output.add_argument("--merge", action="store_true",
                        help="also merge the adapter into the weights: a model that loads with AutoModelForCausalLM")
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    output.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the saved folder to this Hub repo")
    output.add_argument("--public", action="store_true", help="make the Hub repo public (private by default)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _full_blocks(text: str) -> str | list[int]:
    """--full-blocks: "gaps" or comma-separated block indices."""
    if text == "gaps":
        return text
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected gaps or block indices like 3,7, got {text!r}") from None


def _add_heal_settings(group: argparse._ArgumentGroup, prefix: str) -> None:
    """The HealConfig flags: `--steps` ... for `heal`, `--heal-steps` ... for `prune --heal`
    (dests: the HealConfig field names, after `heal_` for prune)."""
    dest = prefix.replace("-", "_")

    def add(flag: str, field: str, **kwargs: Any) -> None:
        group.add_argument(f"--{prefix}{flag}", dest=dest + field, **kwargs)

    add("dataset", "dataset", help=f"training text: Hub dataset, local file/directory, {STDLIB_DOCS}, "
                                   f"{FORTUNES} or {SELF_GENERATED} (the teacher's own samples) (default: {SELF_GENERATED} when "
                                   f"distilling from a teacher held whole, not on disk, else {STDLIB_DOCS})")
    add("dataset-config", "dataset_config", help="its dataset configuration name")
    add("split", "dataset_split", help="its split (default: train)")
    add("text-column", "text_column", help="its text column (default: text)")
    add("seq-len", "seq_len", type=int, help="tokens per training window (default: 256)")
    add("steps", "steps", type=int, help="optimizer steps (default: 200)")
    add("batch-size", "batch_size", type=int, help="windows per step (default: 4)")
    add("learning-rate", "learning_rate", type=float, help="AdamW learning rate (default: 1e-3 when distilling from "
                                            "a teacher, 2e-4 on the next-token loss)")
    add("lr-schedule", "lr_schedule",
        help="the learning rate over the steps: constant, or decaying to 0 on a cosine or linearly (default: constant)")
    add("warmup-ratio", "warmup_ratio", type=float,
        help="share of the steps over which the learning rate rises from 0 (default: 0)")
    add("full-blocks", "full_blocks", type=_full_blocks,
        help="also train these blocks in full, every weight (no LoRA in them): gaps = the kept block before each "
             "removed run, or block indices of the pruned model, comma-separated (default: LoRA only)")
    add("full-learning-rate", "full_learning_rate", type=float,
        help="AdamW learning rate of the blocks trained in full (default: 1e-4)")
    add("seed", "seed", type=int, help="seed for window choice and LoRA initialization (default: 0)")
    add("gradient-checkpointing", "gradient_checkpointing", action="store_true", default=None,
        help="recompute activations in the backward pass: less memory, slower")
    add("gradient-accumulation-steps", "gradient_accumulation_steps", type=int,
        help="batches per optimizer step (default: 1)")
    add("checkpoint-dir", "checkpoint_dir",
        help="save the training state here every --checkpoint-every steps; rerun with the same settings to resume")
    add("checkpoint-every", "checkpoint_every", type=int, help="steps between checkpoints (default: 50)")
    add("teacher", "teacher",
        help="distil from this model (directory, .gguf, packaged name or Hub id); auto: the model the pruned "
             "one was made from, as its config records (next-token loss when it records none); none: the "
             "text's next tokens only (default: auto)")
    add("temperature", "temperature", type=float, help="distillation temperature (default: 1)")
    add("teacher-top-k", "teacher_top_k", type=int,
        help="write the teacher's top-k next-token targets to disk in one pass, then train without it in "
             "memory (a teacher that does not fit beside the student; default: the teacher runs beside)")
    add("teacher-blocks-on-disk", "teacher_blocks_on_disk", action="store_true", default=None,
        help="with --teacher-top-k: load the teacher (a local safetensors folder) with its blocks on disk, one "
             "block in memory during its pass")
    add("next-token-weight", "next_token_weight", type=float,
        help="add the text's next-token loss with this weight (default: 0)")
    add("hidden-weight", "hidden_weight", type=float,
        help="add each kept block's output error to the teacher's at its original index, with this weight "
             "(teacher beside only; default: 0)")
    add("rank", "rank", type=int, help="LoRA rank (default: 8)")
    add("alpha", "alpha", type=float, help="LoRA alpha (default: 16)")
    add("dropout", "dropout", type=float, help="LoRA dropout (default: 0.05)")
    add("target-modules", "target_modules",
        help="comma-separated Linear layer names inside the blocks (default: q/k/v/o and gate/up/down "
             "projections where the blocks have them, else every Linear layer)")
    add("eval-dataset", "eval_dataset",
        help="held-out text for perplexity before and after (default: the evaluation text shipped "
             "with the package)")
    add("eval-dataset-config", "eval_dataset_config", help="its dataset configuration name")
    add("eval-split", "eval_split", help="its split (default: train)")
    add("eval-text-column", "eval_text_column", help="its text column (default: text)")
    add("eval-max-texts", "eval_max_texts", type=int, help="score only its first N texts (default: all)")


def _add_eval(parser: argparse.ArgumentParser) -> None:
    _add_model_to_read(parser, "model directory, .gguf file or Hub id")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows (perplexity) or requests (lm-eval) per forward pass")

    data = parser.add_argument_group("perplexity (default: built-in held-out English text when no --tasks)")
    data.add_argument("--dataset", help="Hub dataset name or local file/directory")
    data.add_argument("--dataset-config", help="dataset configuration name")
    data.add_argument("--split", default="train", help="dataset split (default: train)")
    data.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    data.add_argument("--max-texts", type=int, help="evaluate only the first N texts")
    data.add_argument("--max-length", type=int, help="tokens per window (default: model max positions, at most 1024)")
    data.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")

    tasks = parser.add_argument_group("lm-eval tasks (pip install 'sglp-llm[eval]')")
    tasks.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. sglp_local_ppl,hellaswag")
    tasks.add_argument("--include-path", type=Path, help="folder of your own lm-eval task YAML files")
    tasks.add_argument("--limit", type=int, help="at most N documents per task (quick checks)")

    parser.add_argument("--output-json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--update-card", action="store_true",
                        help="record the results in the folder's sglp_report.json and model card "
                             "(a folder written by `prune`)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_compare(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    how_much = parser.add_argument_group("drop counts to compare").add_mutually_exclusive_group(required=True)
    how_much.add_argument("--drops", help="comma-separated block counts, e.g. 3,6,9")
    how_much.add_argument("--ratios", help="comma-separated fractions of the blocks, e.g. 0.1,0.2,0.3")
    _add_calibration(parser)
    method = _add_method_settings(parser)
    method.add_argument("--methods", help=f"comma-separated methods (default: all of {', '.join(METHODS)})")
    method.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also an SGLP run with these SGLPConfig settings, e.g. "
                             "sglp-rows:segment_feature=rows (repeatable)")
    method.add_argument("--compensations",
                        help=f"comma-separated compensations to measure every plan with, each a run "
                             f"<method>+<compensation> ({', '.join(COMPENSATIONS)}; default: --compensation's)")
    held_out = _add_held_out(
        parser, "held-out perplexity",
        f"text to score the models on, same kinds as --dataset (default: {FORTUNES} when installed, "
        "else the shipped evaluation text); must differ from the calibration data",
        max_texts=DEFAULT_COMPARE_TEXTS,
    )
    held_out.add_argument("--eval-max-length", type=int, help="tokens per perplexity window")
    held_out.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    speed = parser.add_argument_group("generation speed (greedy, KV cache, batch 1)")
    speed.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default: 128)")
    speed.add_argument("--new-tokens", type=int, default=32, help="tokens generated (default: 32)")
    speed.add_argument("--repeats", type=int, default=5, help="timed runs, the median is reported (default: 5)")
    parser.add_argument("--output", type=Path, help="folder for compare.json, compare.md and compare.png")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _read_recipe(path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, SGLP settings) of a recipe file."""
    data = _recipe(path)
    sglp = data.get("sglp") or {}
    if not isinstance(sglp, dict):
        raise ConfigError(f"The `sglp:` section of {str(path)!r} must be a mapping of settings.")
    return {k: data[k] for k in RUN_KEYS if k in data}, SGLPConfig.flat_settings(sglp)


def _recipe(path: Path | None) -> dict[str, Any]:
    """The settings of a recipe file (none without one), its keys checked."""
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"Recipe {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Could not parse recipe {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe {str(path)!r} must be a YAML mapping.")
    unknown = sorted(set(data) - set(RUN_KEYS) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"Unknown recipe key(s) {unknown} in {str(path)!r}: a recipe has {list(RUN_KEYS)}, "
            "an `sglp:` section with SGLPConfig settings and a `heal:` section with HealConfig "
            "settings."
        )
    return data


def _merge_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, SGLP settings): the recipe's, overridden by the flags given."""
    run, sglp = _read_recipe(args.recipe)
    names = {f for f in SGLPConfig.__dataclass_fields__}
    flags = {k: v for k, v in vars(args).items() if v is not None and k in names}
    if isinstance(flags.get("dataset"), list) and len(flags["dataset"]) == 1:  # --dataset X: one source
        flags["dataset"] = flags["dataset"][0]
    if "drop" in flags:
        sglp.pop("ratio", None)
    if "ratio" in flags:
        sglp.pop("drop", None)
    sglp.update(flags)
    for key in RUN_KEYS:
        if getattr(args, key, None) is not None:
            run[key] = getattr(args, key)
    return run, sglp


def resolve_heal_settings(args: argparse.Namespace, prefix: str = ""):
    """The HealConfig of `heal` (prefix "") or `prune --heal` (prefix "heal_"): the recipe's
    `heal:` section, overridden by the flags given."""
    from .heal import HealConfig

    settings = dict(_recipe(args.recipe).get("heal") or {})
    for name in HealConfig.__dataclass_fields__:
        value = getattr(args, prefix + name, None)
        if value is not None:
            settings[name] = _names(value) if name == "target_modules" else value
    return HealConfig.from_dict(settings)


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], SGLPConfig]:
    """Merge defaults, recipe and flags into run settings and a validated SGLPConfig."""
    run, sglp = _merge_settings(args)
    if "drop" not in sglp and "ratio" not in sglp:
        raise ConfigError("Say how many blocks to remove: --drop N or --ratio R (or in the recipe).")
    return run, SGLPConfig.from_dict(sglp)


def _calibration_in_use(loaded, config: SGLPConfig) -> SGLPConfig:
    """`config` with the text the analysis will calibrate on; without --dataset, say which it is
    and why (analyze resolves it the same way and records it)."""
    if config.dataset is not None:
        return config
    from .model.handle import ModelHandle
    from .passes.sampling import default_calibration

    source, obstacle = default_calibration(ModelHandle.for_config(loaded.model, config), loaded.tokenizer)
    if obstacle:
        print(f"No --dataset given: calibrating on the built-in docstrings ({source}), not on the model's own "
              f"samples: {obstacle}", file=sys.stderr)
    else:
        print(f"No --dataset given: calibrating on the model's own samples ({source}: {config.n_samples} windows of "
              f"{config.seq_len} tokens, sampled first), the text whose choice held best on text nobody calibrated on; "
              f"--dataset {STDLIB_DOCS} for the built-in docstrings.", file=sys.stderr)
    return config.replace(dataset=source)


def _load(run: dict[str, Any], config: SGLPConfig | None = None):
    """The model of the run settings, and the config with the device chosen when none was named
    (sglp_llm.model.devices.choose_devices); with `blocks_on_disk`, its blocks stay on disk for the
    sequential pass of `config`."""
    from .model.devices import choose_devices, parse_device_map, parse_max_memory
    from .passes.distributed import process_device, world_size
    from .model.loading import load_blocks_on_disk, load_model
    import torch

    if world_size() == 1:
        run, config, note = choose_devices(run, config, torch.cuda.device_count())
        if note:
            print(note, file=sys.stderr)

    if run.get("blocks_on_disk"):
        if config is None or config.offload != "sequential":
            raise ConfigError("--blocks-on-disk reads one block at a time, which needs --offload sequential.")
        if config.method == "sglp" and config.scoring == "subset":
            raise ConfigError(
                "With --blocks-on-disk the blocks are read one at a time; the subset search (--scoring "
                "subset) runs the whole network with gradients. Use the default loss check or --scoring block."
            )
        if run.get("device_map") is not None:
            raise ConfigError(
                "--blocks-on-disk and --device-map are two ways to place the weights; use one. Under "
                "--offload sequential, --onload-device says where the blocks run."
            )
        loaded = load_blocks_on_disk(
            run.get("model"), dtype=run.get("dtype", "auto"),
            device=config.onload_device or "cpu", layers_path=config.layers_path,
        )
        print(loaded.note, file=sys.stderr)
        return loaded, config
    device_map = parse_device_map(run.get("device_map"))
    if device_map is None and (own := process_device()) is not None:
        device_map = {"": str(own)}  # data parallel: a whole copy on each process's GPU
    loaded = load_model(
        run.get("model"),
        dtype=run.get("dtype", "auto"),
        device_map=device_map,
        max_memory=parse_max_memory(run.get("max_memory")),
        offload_folder=run.get("offload_folder"),
        trust_remote_code=bool(run.get("trust_remote_code", False)),
    )
    if loaded.note:
        print(loaded.note, file=sys.stderr)
    return loaded, config


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _planned_run(run: dict[str, Any], config: SGLPConfig) -> tuple[Any, SGLPConfig, Any, str]:
    """The model's config (no weights read), the settings after choosing devices, the dtype the
    run computes in and where its blocks run."""
    import torch

    from .model.devices import choose_devices
    from .model.loading import load_model_config, resolve_dtype

    run, config, _ = choose_devices(run, config, torch.cuda.device_count())
    model_config = load_model_config(run.get("model"), trust_remote_code=bool(run.get("trust_remote_code", False)))
    dtype = resolve_dtype(run.get("dtype", "auto"))
    dtype = _source_dtype(model_config) if dtype == "auto" else dtype
    device = config.onload_device or ("cpu" if run.get("device_map") in (None, "cpu") else "cuda:0")
    return model_config, config, dtype, device


def _source_dtype(model_config: Any) -> Any:
    import torch

    source = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or torch.float32
    return getattr(torch, source) if isinstance(source, str) else source


def _plan_memory(run: dict[str, Any], config: SGLPConfig, report: Path | None) -> int:
    """`analyze --plan-memory`: the memory plan of this run, from the model's config only."""
    from .passes.memory_plan import plan_memory

    model_config, config, dtype, device = _planned_run(run, config)
    plan = plan_memory(model_config, config, dtype=dtype, source_dtype=_source_dtype(model_config), execution_device=device,
                       blocks_on_disk=bool(run.get("blocks_on_disk")), write=True)
    print(plan.text())
    if report is not None:
        report.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return 0


def _plan_time(run: dict[str, Any], config: SGLPConfig, throughput: float | None, report: Path | None) -> int:
    """`analyze --plan-time`: the predicted compute time of this analysis, from the model's config."""
    from .time_plan import ModelShape, measure_throughput, plan_time, throughput_from_flops

    model_config, config, dtype, device = _planned_run(run, config)
    shape = ModelShape.of(model_config, config.layers_path)
    rate = (throughput_from_flops(shape, throughput * 1e12, config.seq_len) if throughput else
            measure_throughput(model_config, dtype=dtype, device=device, seq_len=config.seq_len, layers_path=config.layers_path))
    plan = plan_time(shape, config, rate)
    print(plan.text())
    if report is not None:
        report.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    from .api import analyze
    from .passes.distributed import is_main_process

    run, config = resolve_settings(args)
    if args.plan_memory:
        return _plan_memory(run, config, args.report)
    if args.plan_time:
        return _plan_time(run, config, args.throughput, args.report)
    loaded, config = _load(run, config)
    _calibration_in_use(loaded, config)
    progress = not args.no_progress and is_main_process()
    plan = analyze(loaded.model, None, config, tokenizer=loaded.tokenizer, progress=progress)
    plan.model_name = loaded.name
    if not is_main_process():  # data parallel: every process has the same plan; one reports it
        return 0
    print(plan.summary())
    _warn_if_unstable(plan)
    if args.report:
        plan.save(args.report)
        print(f"Report written to {args.report}")
    return 0


def _warn_if_unstable(plan) -> None:
    from .stability import stability_warning

    warning = stability_warning(plan.extra.get("stability"))
    if warning:
        print(f"Warning: {warning}", file=sys.stderr)


def run_prune(args: argparse.Namespace) -> int:
    from .api import prune
    from .passes.distributed import is_main_process
    from .evaluation.evaluate import warn_if_not_held_out
    from .output.save import check_destination
    from .output.verify import describe

    start = time.perf_counter()
    run, config = resolve_settings(args)
    heal_config = resolve_heal_settings(args, "heal_") if args.heal else None
    output = run.get("output")
    if output is None:
        raise ConfigError("Say where to write the pruned model: --output DIR (or `output:` in the recipe).")
    output = Path(output)
    check_destination(output, overwrite=args.overwrite)
    evaluate = args.eval_dataset is not None or bool(args.eval_tasks) or args.eval_speed
    if run.get("blocks_on_disk") and (evaluate or heal_config is not None):
        raise ConfigError(
            "With --blocks-on-disk the model is never whole in memory, so it cannot be evaluated or "
            "healed here; prune first, then run `sglp-llm eval` / `sglp-llm heal` on the output."
        )
    loaded, config = _load(run, config)
    calibration = _calibration_in_use(loaded, config)
    if args.eval_dataset is not None:
        warn_if_not_held_out(calibration, args.eval_dataset, config_name=args.eval_dataset_config, split=args.eval_split)
    evaluation = {"dense": _evaluate_in_memory(loaded, args, "dense")} if evaluate else None
    progress = not args.no_progress and is_main_process()
    result = prune(loaded.model, None, config, tokenizer=loaded.tokenizer, progress=progress)
    result.processor = loaded.processor
    # data parallel: every process heals its share of each batch (the Trainer's DDP)
    healed = _heal_pruned(result, heal_config, args, run) if heal_config is not None else None
    if healed is not None:
        healed.processor = loaded.processor
    if not is_main_process():  # every process has the same model; one writes it
        return 0
    result.base_model = loaded.name
    result.plan.model_name = loaded.name
    print(result.plan.summary())
    _warn_if_unstable(result.plan)
    if evaluation:
        evaluation["pruned"] = _evaluate_in_memory(loaded, args, "pruned")
    if healed is None:
        saved = result.save_pretrained(output, overwrite=args.overwrite, evaluation=evaluation)
    else:
        from .heal import heal_summary, save_healed

        print(heal_summary(healed.report))
        if evaluation:
            result.plan.extra["evaluation"] = evaluation
        # merged; the adapter is left out: the unhealed pruned model it applies to is saved nowhere
        saved = save_healed(output, healed, base_model=result.base_model, merge=True, adapter=False,
                            plan=result.plan, overwrite=args.overwrite)
    if args.report:
        result.plan.save(args.report)
    plan = result.plan
    print(
        f"\nBlocks: {plan.num_blocks} -> {len(plan.kept)}   "
        f"Parameters: {_format_count(plan.extra['params_before'])} -> {_format_count(plan.extra['params_after'])}   "
        f"Time: {time.perf_counter() - start:.0f} s"
    )
    print(describe(plan.extra.get("verification")))
    print(f"Pruned model written to {saved} (load it with {_loads_with(loaded)})")
    if args.push_to_hub:
        from .output.hub import push_folder

        url = push_folder(saved, args.push_to_hub, private=not args.public)
        print(f"Uploaded to {url}")
    return 0


def _teacher_kwargs(run: dict[str, Any]) -> dict[str, Any]:
    """How a distillation teacher is loaded: as the run loads its model."""
    from .model.devices import parse_device_map

    return {"dtype": run.get("dtype") or "auto", "device_map": parse_device_map(run.get("device_map")),
            "trust_remote_code": bool(run.get("trust_remote_code"))}


def _heal_pruned(result, config, args: argparse.Namespace, run: dict[str, Any]):
    """`prune --heal`: heal the pruned model in memory (its blocks are where the pruning found
    them)."""
    import dataclasses

    from .passes.distributed import is_main_process
    from .heal import heal

    config = dataclasses.replace(config, layers_path=config.layers_path or result.plan.layers_path)
    return heal(result.model, result.tokenizer, config, teacher_kwargs=_teacher_kwargs(run),
                progress=not args.no_progress and is_main_process())

def run_heal(args: argparse.Namespace) -> int:
    from .passes.distributed import is_main_process
    from .heal import heal, heal_summary, save_healed
    from .plan import REPORT_NAME, PruningPlan
    from .output.save import check_destination

    config = resolve_heal_settings(args)
    recipe = _recipe(args.recipe)
    run = {k: recipe[k] for k in HEAL_RUN_KEYS if k in recipe}
    run.update({k: getattr(args, k) for k in HEAL_RUN_KEYS if getattr(args, k) is not None})
    output = args.output.expanduser().resolve()
    check_destination(output, overwrite=args.overwrite)
    loaded, _ = _load({**run, "model": args.model})
    check_destination(output, overwrite=args.overwrite, model=loaded.model)  # never the input folder
    report = Path(args.model) / REPORT_NAME
    # merged, an SGLP-pruned model's folder stays a pruning output: report, heatmap, card
    plan = PruningPlan.load(report) if args.merge and report.is_file() else None
    # under `accelerate launch` every process trains on its share of each batch (DDP); one writes
    healed = heal(loaded.model, loaded.tokenizer, config, teacher_kwargs=_teacher_kwargs(run),
                  progress=not args.no_progress and is_main_process())
    healed.processor = loaded.processor
    if not is_main_process():
        return 0
    print(heal_summary(healed.report))
    saved = save_healed(
        output, healed, base_model=(plan.model_name if plan else None) or loaded.name, merge=args.merge,
        plan=plan, overwrite=args.overwrite,
    )
    if args.merge:
        print(f"Healed model written to {saved} (load it with {_loads_with(loaded)}; "
              "the adapter alone is in adapter/)")
    else:
        from .model.auto_class import CAUSAL_LM, auto_model_class

        how = ("peft's AutoPeftModelForCausalLM" if auto_model_class(loaded.model.config).__name__ == CAUSAL_LM
               else "peft's PeftModel.from_pretrained over the base model, as its card shows")
        print(f"LoRA adapter written to {saved} (load it with {how}, or heal again with --merge for a plain "
              "transformers model)")
    if args.push_to_hub:
        from .output.hub import push_folder

        url = push_folder(saved, args.push_to_hub, private=not args.public,
                          commit_message="Upload LoRA-healed model")
        print(f"Uploaded to {url}")
    return 0


def _loads_with(loaded) -> str:
    """How the user loads the written model: its Auto class (a model that reads images too needs
    its processor)."""
    from .model.auto_class import auto_model_class

    auto = auto_model_class(loaded.model.config).__name__
    return f"{auto}.from_pretrained" + ("" if loaded.processor is None else " and AutoProcessor")


def _evaluate_in_memory(loaded, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """`prune --eval-*`: evaluate the model as it is now; one column of the card's table."""
    from .api import count_parameters
    from .model.blocks import text_config
    from .evaluation.evaluate import card_metrics, evaluate_model, generation_speed

    results = {}
    if args.eval_dataset is not None or args.eval_tasks:
        results = evaluate_model(
            loaded.model,
            loaded.tokenizer,
            perplexity_source=args.eval_dataset,
            with_perplexity=args.eval_dataset is not None,
            tasks=_names(args.eval_tasks),
            progress=not args.no_progress,
            text_column=args.eval_text_column,
            split=args.eval_split,
            config_name=args.eval_dataset_config,
            max_texts=args.eval_max_texts,
        )
        _print_results(results, f"{label} model: ")
    metrics = card_metrics(results)
    if args.eval_speed:
        max_positions = getattr(text_config(loaded.model), "max_position_embeddings", None) or 160
        prompt = max(1, min(128, max_positions - 32))  # 128 prompt tokens where the model allows
        speed = generation_speed(loaded.model, prompt_tokens=prompt, new_tokens=32)
        metrics.update(
            speed_text=f"greedy generate, batch 1, {prompt} prompt + 32 new tokens, median of 5 runs",
            parameters=count_parameters(loaded.model),
            prefill_tokens_per_s=speed["prefill_tokens_per_s"],
            decode_tokens_per_s=speed["decode_tokens_per_s"],
        )
        print(f"{label} model: {metrics['parameters']:,} parameters   prefill {speed['prefill_tokens_per_s']:.1f} "
              f"tokens/s   decode {speed['decode_tokens_per_s']:.1f} tokens/s")
    return metrics


def _print_results(results: dict[str, Any], prefix: str = "") -> None:
    if "perplexity" in results:
        ppl = results["perplexity"]
        print(
            f"{prefix}Perplexity {ppl['perplexity']:.3f}   bits/byte {ppl['bits_per_byte']:.4f}   "
            f"({ppl['n_tokens']} tokens, {ppl['source']})"
        )
    for task, metrics in results.get("tasks", {}).items():
        print(f"{prefix}{task}: " + "   ".join(f"{name} {value:.4g}" for name, value in metrics.items()))


def _names(text: str | None) -> list[str]:
    """The items of a comma-separated flag value, e.g. --tasks a,b."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _numbers(text: str, kind: type, flag: str, example: str) -> list:
    try:
        return [kind(item) for item in _names(text)]
    except ValueError:
        raise ConfigError(
            f"{flag} takes comma-separated {kind.__name__} values, e.g. {flag} {example}; got {text!r}."
        ) from None


def _single_process(command: str) -> None:
    """`eval` has no data-parallel mode: under `accelerate launch` every process would repeat the
    work and write the same files."""
    from .passes.distributed import world_size

    if world_size() > 1:
        raise ConfigError(
            f"`sglp-llm {command}` runs in one process; start it without `accelerate launch` (use "
            "--device-map auto to spread a large model over several GPUs)."
        )


def run_eval(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import card_metrics, evaluate_model
    from .plan import REPORT_NAME
    from .output.save import record_evaluation, saved_report

    _single_process("eval")
    tasks = _names(args.tasks)
    if args.update_card:
        saved_report(args.model)  # fail before the evaluation, not after
    loaded, _ = _load({"model": args.model, "dtype": args.dtype})
    if args.dataset is None and not tasks:
        print("No --dataset or --tasks given: perplexity on the built-in held-out English text.", file=sys.stderr)
    evaluation = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        perplexity_source=args.dataset,
        with_perplexity=args.dataset is not None or not tasks,
        tasks=tasks,
        include_path=args.include_path,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        text_column=args.text_column,
        split=args.split,
        config_name=args.dataset_config,
        max_texts=args.max_texts,
        max_length=args.max_length,
        stride=args.stride,
    )
    _print_results(evaluation)
    if args.output_json:
        args.output_json.write_text(json.dumps({"model": loaded.name, **evaluation}, indent=2) + "\n")
        print(f"Results written to {args.output_json}")
    if args.update_card:
        folder = record_evaluation(args.model, card_metrics(evaluation))
        print(f"Results recorded in {folder / REPORT_NAME} and its model card README.md")
    elif (Path(args.model) / REPORT_NAME).is_file():
        print(
            f"{args.model} holds an SGLP report: add --update-card to record these results in it "
            "and in its model card.",
            file=sys.stderr,
        )
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .compare import COMPARE_JSON, COMPARE_MD, COMPARE_PNG, compare, default_eval_source, parse_variant
    from .passes.distributed import is_main_process
    from .output.save import check_destination

    run, sglp = _merge_settings(args)
    # compare sets the drop count and method of every run; drop=1 only makes the shared
    # settings a valid SGLPConfig
    sglp.pop("ratio", None)
    config = SGLPConfig.from_dict({**sglp, "drop": 1})
    if run.get("output") is None:
        raise ConfigError("Say where to write the comparison: --output DIR (or `output:` in the recipe).")
    output = Path(run["output"])
    check_destination(output, overwrite=args.overwrite)
    drops = _numbers(args.drops, int, "--drops", "3,6,9") if args.drops else None
    ratios = _numbers(args.ratios, float, "--ratios", "0.1,0.2,0.3") if args.ratios else None
    variants = [parse_variant(spec) for spec in args.variant]
    names = [name for name, _ in variants]
    if len(set(names)) < len(names):
        raise ConfigError(f"Each --variant needs its own name; got {names}.")
    if run.get("blocks_on_disk"):
        raise ConfigError(
            "compare evaluates every pruned model, which needs the model whole in memory; drop "
            "--blocks-on-disk (or blocks_on_disk in the recipe)."
        )
    loaded, config = _load(run, config)
    _calibration_in_use(loaded, config)
    result = compare(
        loaded.model,
        loaded.tokenizer,
        config,
        drops=drops,
        ratios=ratios,
        methods=_names(args.methods) if args.methods else METHODS,
        variants=dict(variants),
        compensations=_names(args.compensations) if args.compensations else None,
        eval_source=args.eval_dataset if args.eval_dataset is not None else default_eval_source(),
        eval_config_name=args.eval_dataset_config,
        eval_split=args.eval_split,
        eval_text_column=args.eval_text_column,
        eval_max_texts=args.eval_max_texts,
        eval_max_length=args.eval_max_length,
        eval_batch_size=args.eval_batch_size,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        model_name=loaded.name,
        progress=not args.no_progress and is_main_process(),
    )
    if not is_main_process():  # data parallel: the analyses are shared; one process writes
        return 0
    result.save(output)
    print(result.table("perplexity"))
    print(f"Comparison written to {output}: {COMPARE_JSON}, {COMPARE_MD}, {COMPARE_PNG}")
    return 0


@contextlib.contextmanager
def _stdout_of_main_process() -> Iterator[None]:
    """Under `accelerate launch` every process runs the command; only the main one prints."""
    from .passes.distributed import is_main_process

    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _hide_library_progress_bars() -> None:
    """--no-progress (and every process but the main one) hides the bars transformers, datasets
    and huggingface_hub draw too: loading weights, reading data files, writing shards."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    from .passes.distributed import is_main_process

    parser = build_parser()
    args = parser.parse_args(argv)
    _model_named_once(parser, args)
    if args.no_progress or not is_main_process():
        _hide_library_progress_bars()
    try:
        commands = {
            "prune": run_prune, "analyze": run_analyze, "eval": run_eval, "compare": run_compare, "heal": run_heal,
        }
        with _stdout_of_main_process():
            return commands[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"sglp-llm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
