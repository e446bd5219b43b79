"""Issue 4's scale measurements, side by side in one run, on a synthetic randomly initialised
LLaMA (LlamaConfig built here; over 1 GB of float32 weights) and random calibration tokens:

(a) time of a whole SGLP `analyze` (method sglp, block scoring) over one bare forward+backward
    (`causal_lm_loss(...).backward()`, every parameter collecting gradients) on the same tokens;
(b) peak memory of sequential mode, with the blocks read one at a time from the safetensors
    checkpoint (`load_with_blocks_on_disk`), over plain mode with the whole model in memory.
    Both load through the same safetensors reader, so they differ only in how many blocks are
    resident; each mode runs in its own process and reports its own ru_maxrss;
(c) how the analysis time grows with calibration tokens (1x, 2x, 4x) and with layer count.

(d) issue 16: the default selection (the loss check) on a random model with LLaMA-3-8B's shapes
    (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab 128256; `--blocks` of them),
    saved as sharded bfloat16 safetensors and pruned from disk (blocks read one at a time,
    computing in float32, which these CPUs run ~300x faster than bfloat16), the pruned model
    written from the source shards: peak RSS measured, beside the memory plan's prediction
    (sglp_llm.passes.memory_plan) and the target 1.5 x (embeddings + head + one block + the stated
    hidden-state budget).

Every measurement runs in a child process (this script with --role), so no mode inherits
another's memory. Writes benchmarks/results/scale.json (a-c), scale-8b.json (d) and scale.md.

    python benchmarks/scale.py            # the full model (about 15 minutes on 2 shared CPU cores)
    python benchmarks/scale.py --quick    # a small model, to check the script
    python benchmarks/scale.py --default-8b --blocks 8    # (d), about 15 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
FULL = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000)
QUICK = dict(hidden_size=256, num_hidden_layers=16, intermediate_size=704, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=4000)
BATCH_SIZE, SEQ_LEN, BASE_BATCHES = 2, 128, 1  # 1x = one batch of 2 x 128 tokens
TOKEN_SCALES = (1, 2, 4)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256)
# (d): calibration 8 x 128 tokens in batches of 2, the loss check on 512 of them, 25 % dropped
CALIBRATION_8B = dict(n_samples=8, seq_len=128, batch_size=2, loss_tokens=512, ratio=0.25)
LAYER_COUNTS = (4, 8, 16)


# ----------------------------------------------------------------------------- child side
def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _batches(n_batches: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": (ids := torch.randint(3, vocab, (BATCH_SIZE, SEQ_LEN), generator=generator)),
         "attention_mask": torch.ones_like(ids)}
        for _ in range(n_batches)
    ]


def _config(offload: str = "none"):
    from sglp_llm import SGLPConfig

    return SGLPConfig(ratio=0.25, scoring="block", seq_len=SEQ_LEN, batch_size=BATCH_SIZE, offload=offload)


def _load(checkpoint: str, whole: bool):
    """The model with its blocks on disk, or (whole) with every block read into memory by the
    same reader, so the two modes differ only in how many blocks are resident."""
    from sglp_llm.model.blocks import find_decoder_blocks
    from sglp_llm.model.offload import BLOCK_LOADER_ATTRIBUTE, load_with_blocks_on_disk

    model = load_with_blocks_on_disk(checkpoint)
    if whole:
        loader = getattr(model, BLOCK_LOADER_ATTRIBUTE)
        for index, block in enumerate(find_decoder_blocks(model).layers):
            loader.onload(index, block, torch.device("cpu"))
        delattr(model, BLOCK_LOADER_ATTRIBUTE)
    return model


def _time_analyze(model, batches, offload: str = "none") -> float:
    from sglp_llm import analyze

    start = time.perf_counter()
    analyze(model, batches, _config(offload), progress=False)
    return time.perf_counter() - start


def _time_forward_backward(model, batches) -> float:
    from sglp_llm.passes.loss import causal_lm_loss

    start = time.perf_counter()
    for batch in batches:
        causal_lm_loss(model, batch).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def role_build(checkpoint: str, dims: dict) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**dims, max_position_embeddings=2 * SEQ_LEN, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.model.layers.parameters())
    return {"parameters": n_params, "block_parameters": block_params, "weights_gb": n_params * 4 / 1e9}


def role_build_8b(checkpoint: str, dims: dict) -> dict:
    """LLaMA-3-8B's shapes with dims["num_hidden_layers"] blocks, random, in bfloat16, saved in
    2 GB shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**dims, max_position_embeddings=1024, tie_word_embeddings=False, dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    model.save_pretrained(checkpoint, max_shard_size="2GB")
    n_params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"parameters": n_params, "block_parameters": block, "files": len(list(Path(checkpoint).glob("*.safetensors")))}


def _settings_8b():
    from sglp_llm import SGLPConfig

    return SGLPConfig(offload="sequential", **CALIBRATION_8B)


def role_prune_8b(checkpoint: str, dims: dict) -> dict:
    """Prune from disk with the default selection and write the result; peak RSS per phase."""
    from sglp_llm import prune
    from sglp_llm.model.offload import load_with_blocks_on_disk

    started = time.perf_counter()
    model = load_with_blocks_on_disk(checkpoint, dtype=torch.float32)
    loaded = _peak_rss_mb()
    generator = torch.Generator().manual_seed(0)
    rows, seq = CALIBRATION_8B["n_samples"], CALIBRATION_8B["seq_len"]
    ids = torch.randint(3, dims["vocab_size"], (rows, seq), generator=generator)
    batches = [{"input_ids": part, "attention_mask": torch.ones_like(part)}
               for part in ids.split(CALIBRATION_8B["batch_size"])]
    result = prune(model, batches, _settings_8b(), progress=False)
    analysed = _peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="sglp-scale-out-", dir=Path(checkpoint).parent) as out:
        saved = result.save_pretrained(Path(out) / "pruned")
        written = sorted(p.name for p in Path(saved).iterdir())
    return {
        "peak_rss_after_load_mb": loaded, "peak_rss_after_prune_mb": analysed, "peak_rss_mb": _peak_rss_mb(),
        "dropped": result.plan.dropped, "timings": result.plan.timings, "seconds": time.perf_counter() - started,
        "written": written, "verification": result.plan.extra.get("verification"),
    }


def role_imports(checkpoint: str, dims: dict) -> dict:
    """What the interpreter, torch, transformers and sglp_llm hold before any model exists."""
    import sglp_llm.api  # noqa: F401
    import transformers  # noqa: F401

    return {"peak_rss_mb": _peak_rss_mb()}


def role_memory(checkpoint: str, dims: dict, offload: str) -> dict:
    model = _load(checkpoint, whole=offload == "none")
    loaded = _rss_mb()
    seconds = _time_analyze(model, _batches(BASE_BATCHES, dims["vocab_size"]), offload)
    return {"rss_after_load_mb": loaded, "peak_rss_mb": _peak_rss_mb(), "analyze_s": seconds}


def role_timing(checkpoint: str, dims: dict) -> dict:
    """(a) and (c) in one process, so every time is measured on the same loaded model; the
    times of (a) are taken twice, interleaved, as other work on the machine slows some runs."""
    from sglp_llm.model.rewrite import remove_blocks

    model = _load(checkpoint, whole=True).eval()
    vocab = dims["vocab_size"]
    base = _batches(BASE_BATCHES, vocab)
    _time_forward_backward(model, base[:1])  # warm-up
    out: dict = {"forward_backward_s": [], "analyze_s": []}
    for _ in range(2):
        out["forward_backward_s"].append(_time_forward_backward(model, base))
        out["analyze_s"].append(_time_analyze(model, base))
    out["analyze_sequential_in_memory_s"] = _time_analyze(model, base, "sequential")
    out["tokens"] = {"1": min(out["analyze_s"])}
    for scale in TOKEN_SCALES[1:]:
        out["tokens"][str(scale)] = _time_analyze(model, _batches(BASE_BATCHES * scale, vocab))
    out["layers"] = {str(dims["num_hidden_layers"]): out["tokens"]["1"]}
    for count in sorted((n for n in LAYER_COUNTS if n < dims["num_hidden_layers"]), reverse=True):
        num_blocks = len(model.model.layers)
        remove_blocks(model, list(range(count, num_blocks)))
        out["layers"][str(count)] = _time_analyze(model, base)
    return out


ROLES = {
    "build": role_build,
    "imports": role_imports,
    "memory-plain": lambda c, d: role_memory(c, d, "none"),
    "memory-sequential": lambda c, d: role_memory(c, d, "sequential"),
    "timing": role_timing,
    "build-8b": role_build_8b,
    "prune-8b": role_prune_8b,
}


# ----------------------------------------------------------------------------- parent side
def _child(role: str, checkpoint: str, dims: dict) -> dict:
    command = [sys.executable, __file__, "--role", role, "--checkpoint", checkpoint, "--dims", json.dumps(dims)]
    print(f"[scale] {role} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"Child {role!r} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[scale] {role}: {time.perf_counter() - started:.0f} s {result}", file=sys.stderr, flush=True)
    return result


def _markdown(r: dict) -> str:
    m, t = r["model"], r["timing"]
    bare, plain = min(t["forward_backward_s"]), min(t["analyze_s"])
    lines = [
        "# Scale benchmark (issue 4)",
        "",
        f"Synthetic random LLaMA: hidden {m['dims']['hidden_size']}, {m['dims']['num_hidden_layers']} layers, "
        f"intermediate {m['dims']['intermediate_size']}, vocab {m['dims']['vocab_size']}: "
        f"{m['parameters'] / 1e9:.2f} B parameters, {m['weights_gb']:.2f} GB float32 "
        f"({m['block_parameters'] / m['parameters']:.0%} in decoder blocks). Calibration 1x = "
        f"{BASE_BATCHES} batch(es) of {BATCH_SIZE} x {SEQ_LEN} random tokens; SGLP ratio 0.25, block "
        f"scoring. {r['machine']}.",
        "",
        "## (a) Analysis time / one forward+backward",
        "",
        "| | seconds | ratio |",
        "|---|---:|---:|",
        f"| bare forward+backward (min of {len(t['forward_backward_s'])}) | {bare:.1f} | 1.00 |",
        f"| SGLP `analyze`, plain (min of {len(t['analyze_s'])}) | {plain:.1f} | **{plain / bare:.2f}** |",
        f"| SGLP `analyze`, sequential (blocks moved within memory) | {t['analyze_sequential_in_memory_s']:.1f} | "
        f"{t['analyze_sequential_in_memory_s'] / bare:.2f} |",
        "",
        "## (b) Peak memory (ru_maxrss of one process per mode)",
        "",
        "| mode | RSS after load (MB) | peak RSS (MB) | analyze (s) |",
        "|---|---:|---:|---:|",
    ]
    for mode in ("plain", "sequential"):
        x = r["memory"][mode]
        lines.append(f"| {mode} | {x['rss_after_load_mb']:.0f} | {x['peak_rss_mb']:.0f} | {x['analyze_s']:.1f} |")
    base = r["memory"]["imports"]["peak_rss_mb"]
    lines += [
        f"| (interpreter + torch + transformers, no model) | | {base:.0f} | |",
        "",
        f"Peak ratio sequential / plain: **{r['ratios']['peak_memory']:.2f}**; above the "
        f"{base:.0f} MB the libraries take before any model exists: {r['ratios']['peak_memory_above_imports']:.2f}. "
        "RSS after loading is small in both modes because safetensors maps the weights lazily: they "
        "count once the analysis reads them (all blocks in plain mode, one at a time in sequential mode).",
        "",
        "## (c) Growth of the analysis time (plain mode)",
        "",
        "| calibration tokens | seconds | vs 1x |",
        "|---|---:|---:|",
    ]
    for scale, seconds in t["tokens"].items():
        lines.append(f"| {scale}x ({int(scale) * BASE_BATCHES * BATCH_SIZE * SEQ_LEN}) | {seconds:.1f} | "
                     f"{seconds / t['tokens']['1']:.2f} |")
    lines += ["", "| decoder layers | seconds | vs smallest |", "|---|---:|---:|"]
    layers = sorted(t["layers"].items(), key=lambda kv: int(kv[0]))
    for count, seconds in layers:
        lines.append(f"| {count} | {seconds:.1f} | {seconds / layers[0][1]:.2f} |")
    return "\n".join(lines) + "\n"


def default_8b(blocks: int) -> dict:
    """(d): build, measure in a child each, and the memory plan's prediction beside them."""
    from transformers import AutoConfig

    from sglp_llm.passes.memory_plan import plan_memory

    dims = {**LLAMA3_8B, "num_hidden_layers": blocks}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sglp-scale-8b-") as folder:
        checkpoint = str(Path(folder) / "model")
        built = _child("build-8b", checkpoint, dims)
        imports = _child("imports", checkpoint, dims)
        measured = _child("prune-8b", checkpoint, dims)
        config = AutoConfig.from_pretrained(checkpoint)
    plan = plan_memory(config, _settings_8b(), dtype=torch.float32, source_dtype=torch.bfloat16,
                       blocks_on_disk=True, write=True)
    parts = plan.phases["statistics forward"]["cpu"]
    states = max(parts.get("hidden states of every block", 0),
                 parts.get("hidden states of two block positions (the rest on disk)", 0),
                 plan.phases["loss check"]["cpu"]["kept block outputs of the pruned network so far"])
    budget = parts["embeddings, final norm, head"] + parts["one decoder block"] + states
    predicted = plan.peak()["cpu"] / 2**20
    return {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, CPU only",
        "dims": dims, "calibration": CALIBRATION_8B, "model": built, "imports": imports, "measured": measured,
        "plan": plan.to_dict(), "predicted_peak_mb": predicted,
        "budget_mb": {"embeddings_head": parts["embeddings, final norm, head"] / 2**20,
                      "one_block": parts["one decoder block"] / 2**20, "hidden_states": states / 2**20,
                      "total": budget / 2**20},
        "ratios": {"peak_over_budget": measured["peak_rss_mb"] / (budget / 2**20),
                   "predicted_over_measured": predicted / measured["peak_rss_mb"]},
        "benchmark_s": time.perf_counter() - started,
    }


def _markdown_8b(r: dict) -> str:
    d, m, b, ratios = r["dims"], r["measured"], r["budget_mb"], r["ratios"]
    c = r["calibration"]
    plan_lines = [f"| {phase} | {sum(devices['cpu'].values()) / 2**20:.0f} |" for phase, devices in r["plan"]["phases"].items()]
    return "\n".join([
        "## (d) The default selection from disk, LLaMA-3-8B shapes (issue 16)", "",
        f"Random LLaMA with hidden {d['hidden_size']}, intermediate {d['intermediate_size']}, "
        f"{d['num_attention_heads']} heads / {d['num_key_value_heads']} KV heads, vocab {d['vocab_size']}, "
        f"{d['num_hidden_layers']} blocks ({r['model']['parameters'] / 1e9:.2f} B parameters), saved as "
        f"{r['model']['files']} bfloat16 safetensors shards; blocks read from disk one at a time "
        f"(`load_with_blocks_on_disk`, float32 compute), calibration {c['n_samples']} x {c['seq_len']} random "
        f"tokens in batches of {c['batch_size']}, loss check on {c['loss_tokens']} tokens, ratio {c['ratio']}; "
        f"{r['machine']}.", "",
        f"- dropped {m['dropped']} in {m['seconds']:.0f} s (analysis {m['timings']['total_s']:.0f} s); "
        f"written: {len(m['written'])} files",
        f"- peak RSS: {m['peak_rss_mb']:.0f} MB (after loading {m['peak_rss_after_load_mb']:.0f}, after the "
        f"analysis and verification {m['peak_rss_after_prune_mb']:.0f}); interpreter and libraries alone "
        f"{r['imports']['peak_rss_mb']:.0f} MB",
        f"- budget: embeddings + head {b['embeddings_head']:.0f} MB + one block {b['one_block']:.0f} MB + "
        f"stated hidden states {b['hidden_states']:.0f} MB = {b['total']:.0f} MB; peak / budget = "
        f"**{ratios['peak_over_budget']:.2f}** (target at most 1.5)",
        f"- memory plan (`sglp-llm analyze --plan-memory`): predicted peak {r['predicted_peak_mb']:.0f} MB; "
        f"predicted / measured = **{ratios['predicted_over_measured']:.2f}** (target within 0.8-1.2)", "",
        "| phase (plan) | predicted CPU MB |", "|---|---:|", *plan_lines, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, to check the script")
    parser.add_argument("--default-8b", action="store_true", help="(d) only: LLaMA-3-8B shapes from disk")
    parser.add_argument("--blocks", type=int, default=8, help="(d): how many 8B-shaped blocks")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--dims", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(ROLES[args.role](args.checkpoint, json.loads(args.dims))))
        return

    if args.default_8b:
        results = default_8b(args.blocks)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scale-8b.json").write_text(json.dumps(results, indent=2))
        earlier = json.loads((RESULTS / "scale.json").read_text()) if (RESULTS / "scale.json").is_file() else None
        (RESULTS / "scale.md").write_text((_markdown(earlier) + "\n" if earlier else "") + _markdown_8b(results))
        print(_markdown_8b(results))
        return
    dims = QUICK if args.quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sglp-scale-") as checkpoint:
        model = {"dims": dims, **_child("build", checkpoint, dims)}
        memory = {
            "imports": _child("imports", checkpoint, dims),
            "plain": _child("memory-plain", checkpoint, dims),
            "sequential": _child("memory-sequential", checkpoint, dims),
        }
        timing = _child("timing", checkpoint, dims)
    base = memory["imports"]["peak_rss_mb"]
    plain, sequential = memory["plain"]["peak_rss_mb"], memory["sequential"]["peak_rss_mb"]
    bare = min(timing["forward_backward_s"])
    tokens, layers = timing["tokens"], timing["layers"]
    results = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, CPU only",
        "model": model,
        "memory": memory,
        "timing": timing,
        "ratios": {
            "analyze_over_forward_backward": min(timing["analyze_s"]) / bare,
            "sequential_analyze_over_forward_backward": timing["analyze_sequential_in_memory_s"] / bare,
            "peak_memory": sequential / plain,
            "peak_memory_above_imports": (sequential - base) / (plain - base),
            "time_vs_tokens": {k: v / tokens["1"] for k, v in tokens.items()},
            "time_vs_layers": {k: v / layers[min(layers, key=int)] for k, v in layers.items()},
        },
        "benchmark_s": time.perf_counter() - started,
    }
    if not args.quick:  # a check of the script records nothing
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scale.json").write_text(json.dumps(results, indent=2))
        eight = RESULTS / "scale-8b.json"
        (RESULTS / "scale.md").write_text(
            _markdown(results) + ("\n" + _markdown_8b(json.loads(eight.read_text())) if eight.is_file() else ""))
    print(_markdown(results))


if __name__ == "__main__":
    main()
