"""`sglp-llm` command line: `prune` writes a shallower model, `analyze` prints the plan, `eval` scores one.

Settings come from, in increasing priority: SGLPConfig defaults, a YAML recipe (`--recipe`),
and the flags given on the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import ConfigError, SCORING_MODES, SEGMENT_FEATURES, SGLPConfig

# recipe keys that describe the run rather than the SGLP settings
RUN_KEYS = ("model", "dtype", "device_map", "output", "trust_remote_code")


def _add_common(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="Hub id, local directory or .gguf file (default: the packaged SmolLM2-135M)")
    model.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default: auto)")
    model.add_argument("--device-map", help="accelerate device map: auto, balanced, sequential, cpu, ...")
    model.add_argument("--trust-remote-code", action="store_true", default=None,
                       help="allow the model repository's own Python code to run (off by default)")
    model.add_argument("--layers-path", help="dotted path to the decoder blocks' ModuleList, e.g. model.layers")
    model.add_argument("--recipe", type=Path, help="YAML recipe; flags given here override it")

    how_much = parser.add_argument_group("how much to prune").add_mutually_exclusive_group()
    how_much.add_argument("--drop", type=int, help="number of decoder blocks to remove")
    how_much.add_argument("--ratio", type=float, help="fraction of decoder blocks to remove")

    data = parser.add_argument_group("calibration data")
    data.add_argument("--dataset", help="Hub dataset name or local file/directory (default: built-in English text)")
    data.add_argument("--dataset-config", help="dataset configuration name")
    data.add_argument("--split", dest="dataset_split", help="dataset split (default: train)")
    data.add_argument("--text-column", help="column holding the text (default: text)")
    data.add_argument("--seq-len", type=int, help="tokens per calibration window")
    data.add_argument("--n-samples", type=int, help="number of calibration windows")
    data.add_argument("--batch-size", type=int, help="windows per forward/backward pass")
    data.add_argument("--seed", type=int, help="seed for window selection and CKA minibatches")

    method = parser.add_argument_group("method")
    method.add_argument("--scoring", choices=SCORING_MODES, help="per-block GradNorm or the paper's subset search")
    method.add_argument("--segment-feature", choices=SEGMENT_FEATURES, help="CKA column sums or CKA rows")
    method.add_argument("--num-segments", type=int, help="fixed number of segments (default: automatic)")
    method.add_argument("--cka-minibatch-tokens", type=int, help="tokens per CKA minibatch")
    method.add_argument("--max-candidates", type=int, help="cap on keep-sets scored per segment (subset search)")

    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--report", type=Path, help="also write the JSON report to this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglp-llm",
        description="Depth-prune Hugging Face causal LMs with SGLP (CKA + Fisher segmentation + GradNorm).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="analyze a model and write the pruned model")
    _add_common(prune)
    prune.add_argument("--output", type=Path, help="output directory for the pruned model")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    prune.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the saved folder to this Hub repo")
    prune.add_argument("--public", action="store_true", help="make the Hub repo public (private by default)")
    analyze = sub.add_parser("analyze", help="print which blocks would be dropped, write nothing")
    _add_common(analyze)
    _add_eval(sub.add_parser("eval", help="perplexity and lm-eval tasks of a (pruned) model"))
    return parser


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory, .gguf file or Hub id")
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
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _read_recipe(path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, SGLP settings) of a recipe file."""
    if path is None:
        return {}, {}
    if not path.is_file():
        raise ConfigError(f"Recipe {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Could not parse recipe {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe {str(path)!r} must be a YAML mapping.")
    unknown = sorted(set(data) - set(RUN_KEYS) - {"sglp"})
    if unknown:
        raise ConfigError(
            f"Unknown recipe key(s) {unknown} in {str(path)!r}: a recipe has {list(RUN_KEYS)} "
            "and an `sglp:` section with SGLPConfig settings."
        )
    return {k: data[k] for k in RUN_KEYS if k in data}, dict(data.get("sglp") or {})


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], SGLPConfig]:
    """Merge defaults, recipe and flags into run settings and a validated SGLPConfig."""
    run, sglp = _read_recipe(args.recipe)
    names = {f for f in SGLPConfig.__dataclass_fields__}
    flags = {k: v for k, v in vars(args).items() if v is not None and k in names}
    if "drop" in flags:
        sglp.pop("ratio", None)
    if "ratio" in flags:
        sglp.pop("drop", None)
    sglp.update(flags)
    for key in RUN_KEYS:
        if getattr(args, key, None) is not None:
            run[key] = getattr(args, key)
    if "drop" not in sglp and "ratio" not in sglp:
        raise ConfigError("Say how many blocks to remove: --drop N or --ratio R (or in the recipe).")
    return run, SGLPConfig.from_dict(sglp)


def _load(run: dict[str, Any]):
    from .loading import load_model

    loaded = load_model(
        run.get("model"),
        dtype=run.get("dtype", "auto"),
        device_map=run.get("device_map"),
        trust_remote_code=bool(run.get("trust_remote_code", False)),
    )
    if loaded.note:
        print(loaded.note, file=sys.stderr)
    return loaded


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def run_analyze(args: argparse.Namespace) -> int:
    from .api import analyze

    run, config = resolve_settings(args)
    loaded = _load(run)
    if config.dataset is None:
        print("No --dataset given: calibrating on the built-in English text.", file=sys.stderr)
    plan = analyze(loaded.model, None, config, tokenizer=loaded.tokenizer, progress=not args.no_progress)
    plan.model_name = loaded.name
    print(plan.summary())
    if args.report:
        plan.save(args.report)
        print(f"Report written to {args.report}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from .api import prune
    from .save import check_destination

    start = time.perf_counter()
    run, config = resolve_settings(args)
    output = run.get("output")
    if output is None:
        raise ConfigError("Say where to write the pruned model: --output DIR (or `output:` in the recipe).")
    output = Path(output)
    check_destination(output, overwrite=args.overwrite)
    loaded = _load(run)
    if config.dataset is None:
        print("No --dataset given: calibrating on the built-in English text.", file=sys.stderr)
    result = prune(loaded.model, None, config, tokenizer=loaded.tokenizer, progress=not args.no_progress)
    result.base_model = loaded.name
    result.plan.model_name = loaded.name
    print(result.plan.summary())
    saved = result.save_pretrained(output, overwrite=args.overwrite)
    if args.report:
        result.plan.save(args.report)
    plan = result.plan
    print(
        f"\nBlocks: {plan.num_blocks} -> {len(plan.kept)}   "
        f"Parameters: {_format_count(plan.extra['params_before'])} -> {_format_count(plan.extra['params_after'])}   "
        f"Time: {time.perf_counter() - start:.0f} s"
    )
    print(f"Pruned model written to {saved} (load it with AutoModelForCausalLM.from_pretrained)")
    if args.push_to_hub:
        from .hub import push_folder

        url = push_folder(saved, args.push_to_hub, private=not args.public)
        print(f"Uploaded to {url}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import perplexity_on_source, run_lm_eval

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    loaded = _load({"model": args.model, "dtype": args.dtype})
    results: dict[str, Any] = {"model": loaded.name}
    if args.dataset is not None or not tasks:
        if args.dataset is None:
            print("No --dataset or --tasks given: perplexity on the built-in held-out English text.", file=sys.stderr)
        ppl = perplexity_on_source(
            loaded.model,
            loaded.tokenizer,
            args.dataset,
            text_column=args.text_column,
            split=args.split,
            config_name=args.dataset_config,
            max_texts=args.max_texts,
            max_length=args.max_length,
            stride=args.stride,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        print(
            f"Perplexity {ppl['perplexity']:.3f}   bits/byte {ppl['bits_per_byte']:.4f}   "
            f"({ppl['n_tokens']} tokens, {ppl['source']})"
        )
        results["perplexity"] = ppl
    if tasks:
        results["tasks"] = run_lm_eval(
            loaded.model,
            loaded.tokenizer,
            tasks=tasks,
            include_path=args.include_path,
            limit=args.limit,
            batch_size=args.batch_size,
        )
        for task, metrics in results["tasks"].items():
            print(f"{task}: " + "   ".join(f"{name} {value:.4g}" for name, value in metrics.items()))
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"Results written to {args.output_json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prune": run_prune, "analyze": run_analyze, "eval": run_eval}[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"sglp-llm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
