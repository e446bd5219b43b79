"""Compare pruning methods on one model: every method (and named SGLP variants) at several drop
counts, each with every compensation asked for (sglp_llm.recovery.compensate, folded into the kept weights
for the measurement and taken out after), scored by held-out perplexity, analysis time and
generation speed.

The model is loaded once. Each plan is applied with `rewrite.skip_blocks`, which really takes the
dropped blocks out of the ModuleList, so the perplexity and speed measured inside are those of
the pruned model, and the dense model is back on exit for the next method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from .api import analyze, count_parameters, fit_plan_compensation
from .recovery.compensate import fold
from .model.handle import ModelHandle
from .passes.sampling import default_calibration, model_sampler
from . import data
from .config import COMPENSATIONS, METHODS, ConfigError, SGLPConfig
from .data import FORTUNES, CalibrationSet, prepare_calibration
from .evaluation.evaluate import generation_speed, load_eval_texts, perplexity, warn_if_not_held_out
from .model.rewrite import skip_blocks

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare.png"
# SGLPConfig fields that decide the calibration batches: runs that agree on them share one set
# per run: what compare.md shows, in which table, and how
TABLES = (
    ("Held-out perplexity", "perplexity", "{:.3f}"),
    ("Held-out bits per byte", "bits_per_byte", "{:.4f}"),
    ("Analysis time (s)", "analysis_s", "{:.1f}"),
    ("Prefill speed (tokens/s)", "prefill_tokens_per_s", "{:.1f}"),
    ("Decode speed (tokens/s)", "decode_tokens_per_s", "{:.1f}"),
    ("Parameters (millions)", "params", "{:.4g}"),
    ("Dropped blocks", "dropped", "{}"),
)


def default_eval_source() -> str | None:
    """Debian's fortunes when installed (text unlike the stdlib-docs calibration default),
    else None: the evaluation text shipped with the package."""
    return FORTUNES if data.FORTUNES_DIR.is_dir() else None


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """`name:key=value,key=value` -> (name, SGLPConfig overrides); each value is read as a YAML
    scalar, so `3`, `0.1`, `true`, `null` and `rows` mean what they say."""
    name, sep, body = spec.partition(":")
    pairs = [[part.strip() for part in item.partition("=")] for item in body.split(",")]
    if sep and name.strip() and all(key and eq and value for key, eq, value in pairs):
        try:
            return name.strip(), {key: yaml.safe_load(value) for key, _, value in pairs}
        except yaml.YAMLError:
            pass
    raise ConfigError(
        f"Variant {spec!r} is not of the form name:key=value,key=value, e.g. "
        "sglp-rows:segment_feature=rows."
    )


@dataclass
class Comparison:
    """What `compare` measured; `save` writes it as compare.json, compare.md and compare.png."""

    model: str
    num_blocks: int
    drops: list[int]
    calibration: dict[str, str]  # run name -> calibration text description
    evaluation: dict[str, Any]  # held-out text: source, texts, tokens
    speed: dict[str, Any]  # how generation speed was measured
    dense: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # run name -> why its compensation could not be folded (e.g. a post-feedforward norm)
    refused: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, output_dir: str | Path) -> "Comparison":
        return cls(**json.loads((Path(output_dir) / COMPARE_JSON).read_text()))

    def save(self, output_dir: str | Path) -> Path:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / COMPARE_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (output_dir / COMPARE_MD).write_text(self.markdown())
        self.plot(output_dir / COMPARE_PNG)
        return output_dir

    def run_names(self) -> list[str]:
        return list(dict.fromkeys(run["method"] for run in self.runs))

    def markdown(self) -> str:
        """A header with the dense reference, then per quantity a table: rows methods, columns
        drop counts."""
        dense = self.dense
        calibration = sorted(set(self.calibration.values()))
        lines = [
            f"# Depth-pruning comparison: {self.model}",
            "",
            f"- blocks: {self.num_blocks}; drop counts: {', '.join(map(str, self.drops))}",
            f"- calibration: {'; '.join(calibration)}",
            f"- held-out evaluation: {self.evaluation['source']}; scored {self.evaluation['n_texts']} "
            f"texts, {self.evaluation['n_tokens']:,} tokens",
            "- analysis time: the plan's wall time; the calibration batches are prepared once, before",
            f"- speed: greedy `generate` with KV cache, batch 1, {self.speed['prompt_tokens']} prompt "
            f"tokens then {self.speed['new_tokens']} new tokens, median of {self.speed['repeats']} runs",
            f"- dense model: perplexity {dense['perplexity']:.3f}, bits per byte "
            f"{dense['bits_per_byte']:.4f}, prefill {dense['prefill_tokens_per_s']:.1f} tokens/s, "
            f"decode {dense['decode_tokens_per_s']:.1f} tokens/s, {dense['params'] / 1e6:.4g}M parameters",
        ]
        if self.variants:
            lines.append("- variants (SGLP runs with other settings): " + "; ".join(
                f"{name}: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
                for name, overrides in self.variants.items()
            ))
        if self.refused:
            lines.append("- not measured, the compensation refused: " + "; ".join(
                f"{name}: {why}" for name, why in self.refused.items()))
        for title, key, _ in TABLES:
            lines += ["", f"## {title}", "", self.table(key)]
        return "\n".join(lines) + "\n"

    def table(self, key: str) -> str:
        """A markdown table of one per-run quantity (a key of TABLES): rows are methods, columns
        drop counts."""
        fmt = {k: f for _, k, f in TABLES}[key]
        cells = {(run["method"], run["drop"]): run[key] for run in self.runs}
        lines = [
            "| method | " + " | ".join(f"drop {n}" for n in self.drops) + " |",
            "|---" * (len(self.drops) + 1) + "|",
        ]
        for name in self.run_names():
            lines.append(f"| {name} | " + " | ".join(
                _format(cells[name, n], key, fmt) if (name, n) in cells else "–" for n in self.drops
            ) + " |")
        return "\n".join(lines)

    def plot_order_and_ceiling(self) -> tuple[list[str], float]:
        """The methods best first (by their mean log-ratio to the best perplexity at each drop
        count they ran), and the plot's top: 4× the worst of the per-drop best, so the
        competitive lines are not flattened by a method that exploded; lines above it leave the
        chart."""
        best: dict[int, float] = {}
        for run in self.runs:
            best[run["drop"]] = min(best.get(run["drop"], math.inf), run["perplexity"])
        ratios: dict[str, list[float]] = {}
        for run in self.runs:
            ratios.setdefault(run["method"], []).append(math.log(run["perplexity"] / best[run["drop"]]))
        order = sorted(ratios, key=lambda name: (sum(ratios[name]) / len(ratios[name]), name))
        return order, 4 * max(best.values())

    def plot(self, path: str | Path) -> Path:
        """Held-out perplexity against blocks dropped, one line per method (legend best first),
        the dense model as a horizontal reference; log-scale y, since pruning raises perplexity
        multiplicatively. SGLP's default is drawn thick, the peer baselines dashed."""
        order, ceiling = self.plot_order_and_ceiling()
        fig = Figure(figsize=(10, max(4.5, 0.22 * len(order) + 1)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        colours = matplotlib.colormaps["tab20"].colors
        for i, name in enumerate(order):
            runs = sorted((r for r in self.runs if r["method"] == name), key=lambda r: r["drop"])
            base = runs[0].get("base_method", name)
            style = {"lw": 3, "color": "black", "zorder": 3} if name == "sglp" else {
                "lw": 1.2, "color": colours[i % len(colours)], "ls": "--" if base != "sglp" else "-",
            }
            ax.plot([r["drop"] for r in runs], [r["perplexity"] for r in runs],
                    marker="osD^v<>"[i % 7], label=name, **style)
        dense = self.dense["perplexity"]
        ax.axhline(dense, color="grey", ls=":", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_ylim(0.9 * dense, ceiling)
        ax.set_xticks(self.drops)
        ax.set_xlabel(f"blocks dropped (of {self.num_blocks})")
        ax.set_ylabel(f"held-out perplexity (above {ceiling:.4g}: off the chart)")
        ax.set_title(self.model)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="best first")
        fig.savefig(path, format="png", dpi=120)
        return Path(path)


def _format(value: Any, key: str, fmt: str) -> str:
    if key == "params":
        value = value / 1e6
    if key == "dropped":
        value = ", ".join(map(str, value))
    return fmt.format(value)


def compare(
    model: nn.Module,
    tokenizer: Any,
    config: SGLPConfig,
    *,
    drops: Sequence[int] | None = None,
    ratios: Sequence[float] | None = None,
    methods: Sequence[str] = METHODS,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    compensations: Sequence[str] | None = None,
    eval_source: str | None = None,
    eval_config_name: str | None = None,
    eval_split: str = "train",
    eval_text_column: str = "text",
    eval_max_texts: int | None = None,
    eval_max_length: int | None = None,
    eval_batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    model_name: str | None = None,
    progress: bool = True,
    resume: Comparison | None = None,
    on_result: Callable[[Comparison], None] | None = None,
) -> Comparison:
    """Analyze `model` with every method in `methods` and every variant (name -> SGLPConfig
    overrides of an SGLP run) at each drop count (`drops`, or `ratios` of the blocks), starting
    from `config` (calibration data and shared settings; its drop/ratio and method are
    replaced). Every plan is measured with each of `compensations` (default: `config`'s), a run
    named "<method>+<compensation>" for each but "none". Each pruned model and the dense one are
    scored on the held-out `eval_source`
    (see `evaluate.load_eval_texts`) and timed with `evaluate.generation_speed`. The model is
    left unchanged.

    Long comparisons: `on_result` receives the comparison so far after every measurement (e.g.
    to save it), and `resume` (an earlier, possibly partial comparison of the same setup) keeps
    its dense reference and runs instead of measuring them again.
    """
    handle = ModelHandle.for_config(model, config)
    if config.dataset is None:  # every contender calibrates on the text analyze would choose
        config = config.replace(dataset=default_calibration(handle, tokenizer)[0])
    num_blocks = len(handle.layers)
    contenders = _contenders(config, methods, variants or {})
    compensations = list(dict.fromkeys(compensations or [config.compensation]))
    unknown = [c for c in compensations if c not in COMPENSATIONS]
    if unknown:
        raise ConfigError(f"Unknown compensation(s) {unknown}: choose from {', '.join(COMPENSATIONS)}.")
    counts = _drop_counts(config, drops, ratios, num_blocks)
    runs = [(name, cfg.replace(drop=n)) for name, cfg in contenders.items() for n in counts]
    for _, cfg in runs:  # fail before hours of analysis, not in the middle
        cfg.resolve_drop(num_blocks)
    for cfg in {c.calibration_key(): c for c in contenders.values()}.values():
        warn_if_not_held_out(cfg, eval_source, config_name=eval_config_name, split=eval_split)
    texts, eval_description = load_eval_texts(
        eval_source, text_column=eval_text_column, split=eval_split,
        config_name=eval_config_name, max_texts=eval_max_texts,
    )

    def measure() -> dict[str, Any]:
        ppl = perplexity(
            model, tokenizer, texts, max_length=eval_max_length, batch_size=eval_batch_size, progress=False
        )
        speed = generation_speed(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
        return {
            "perplexity": ppl["perplexity"],
            "bits_per_byte": ppl["bits_per_byte"],
            "n_tokens": ppl["n_tokens"],
            "params": count_parameters(model),
            "prefill_tokens_per_s": speed["prefill_tokens_per_s"],
            "decode_tokens_per_s": speed["decode_tokens_per_s"],
        }

    done = {(r["method"], r["drop"]): r for r in resume.runs} if resume is not None else {}
    # a resumed comparison keeps the descriptions of the runs earlier invocations made
    earlier_calibration = resume.calibration if resume is not None else {}
    earlier_variants = resume.variants if resume is not None else {}
    refused = dict(resume.refused) if resume is not None else {}
    bar = tqdm(total=len(runs) * len(compensations) + 1, desc="Compare", disable=not progress)
    bar.set_postfix_str("dense")
    dense = resume.dense if resume is not None and resume.dense else measure()
    bar.update()
    calibrations: dict[tuple, CalibrationSet] = {}
    statistics: dict = {}  # one statistics pass (and one SLEB run) serves every drop count
    results: list[dict[str, Any]] = []

    def so_far() -> Comparison:
        return Comparison(
            model=model_name or getattr(model, "name_or_path", None) or "model",
            num_blocks=num_blocks,
            drops=counts,
            calibration={**earlier_calibration, **{name: _calibration_source(cfg, calibrations) for name, cfg in contenders.items()}},
            evaluation={"source": eval_description, "n_texts": len(texts), "n_tokens": dense["n_tokens"]},
            speed={"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                   "device": str(handle.input_device)},
            dense=dense,
            # runs of `resume` not reached yet stay in every intermediate save
            runs=results + [r for key, r in done.items() if key not in {(x["method"], x["drop"]) for x in results}],
            variants={**earlier_variants, **{name: dict(overrides) for name, overrides in (variants or {}).items()}},
            refused=dict(refused),
        )

    for name, cfg in runs:
        names = {c: name if c == "none" else f"{name}+{c}" for c in compensations}
        todo = [c for c, run_name in names.items() if (run_name, cfg.drop) not in done and run_name not in refused]
        results += [done[run_name, cfg.drop] for run_name in names.values() if (run_name, cfg.drop) in done]
        bar.update(len(names) - len(todo))
        if not todo:
            continue
        bar.set_postfix_str(f"{name}, drop {cfg.drop}")
        key = _calibration_key(cfg)
        if key not in calibrations:
            calibrations[key] = prepare_calibration(None, tokenizer, cfg,
                                                    sampler=model_sampler(handle, tokenizer, progress=False))
        plan = analyze(
            handle, calibrations[key], cfg, tokenizer=tokenizer, progress=False, statistics_cache=statistics
        )
        for compensation in todo:
            unfold, started = None, time.perf_counter()
            if compensation != "none":
                try:
                    unfold = fold(handle, fit_plan_compensation(handle, calibrations[key].batches, plan, compensation))
                except ConfigError as error:
                    refused[names[compensation]] = str(error)
                    bar.update()
                    continue
            compensation_s = time.perf_counter() - started
            try:
                with skip_blocks(handle, plan.dropped):
                    measured = measure()
            finally:
                if unfold is not None:
                    unfold()
            results.append({
                "method": names[compensation],
                "base_method": cfg.method,
                "compensation": compensation,
                "drop": cfg.drop,
                "dropped": plan.dropped,
                "analysis_s": plan.timings["total_s"],
                "timings": plan.timings,  # where the analysis time went (statistics pass, selection)
                "compensation_s": compensation_s,  # fitting and folding T (0 for none)
                **measured,
            })
            bar.update()
            if on_result is not None:
                on_result(so_far())
    bar.close()
    return so_far()


def _calibration_source(config: SGLPConfig, calibrations: dict[tuple, CalibrationSet]) -> str:
    """The calibration text's description, or its setting while no run has prepared it yet."""
    prepared = calibrations.get(_calibration_key(config))
    return prepared.source if prepared is not None else str(config.dataset)


def _calibration_key(config: SGLPConfig) -> tuple:
    return config.calibration_key()


def _contenders(
    config: SGLPConfig, methods: Sequence[str], variants: Mapping[str, Mapping[str, Any]]
) -> dict[str, SGLPConfig]:
    """Run name -> config: each method, then each variant (an SGLP run with overrides)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"Unknown or no method(s) {unknown}: choose from {', '.join(METHODS)}.")
    contenders = {m: config.replace(method=m) for m in methods}
    for name, overrides in variants.items():
        if name in contenders:
            raise ConfigError(f"Variant name {name!r} is already taken by a method or variant; rename it.")
        if {"drop", "ratio"} & set(overrides):
            raise ConfigError(
                f"Variant {name!r} sets drop or ratio: the drop counts of a comparison come from "
                "--drops or --ratios and are the same for every method."
            )
        contenders[name] = SGLPConfig.from_dict({**config.to_dict(), "method": "sglp", **overrides})
    return contenders


def _drop_counts(
    config: SGLPConfig, drops: Sequence[int] | None, ratios: Sequence[float] | None, num_blocks: int
) -> list[int]:
    """Sorted distinct drop counts from `drops`, or from `ratios` of `num_blocks` (rounded)."""
    if (drops is None) == (ratios is None) or not (drops or ratios):
        raise ConfigError("Give the drop counts to compare: drops (e.g. 3,6,9) or ratios (e.g. 0.1,0.2,0.3), not both.")
    amounts = [{"drop": n} for n in drops] if drops is not None else [{"ratio": r} for r in ratios]
    return sorted({config.replace(**amount).resolve_drop(num_blocks) for amount in amounts})
