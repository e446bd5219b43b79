"""The README.md model card written next to a pruned model: what was removed and why, how to load
and evaluate it, so a pushed checkpoint explains itself on the Hub.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..explain import chosen_by, kept_for_attention, stages
from ..model.auto_class import CAUSAL_LM, IMAGES
from .heatmap import HEATMAP_NAME
from ..plan import PruningPlan
from ..stability import describe_stability
from .verify import describe

TAGS = ["sglp-llm", "depth-pruning", "pruned"]
MODEL_ID = "<path-or-repo-id>"
PAPER = "https://arxiv.org/abs/2410.14720"
# per method: (name in the title, how the blocks were chosen)
METHOD_TEXT = {
    "sglp": ("SGLP", f"[SGLP]({PAPER}) (the stages that ran are listed under How the blocks were chosen)"),
    "block-influence": ("ShortGPT Block Influence", "ShortGPT's Block Influence "
                        "([Men et al. 2024](https://arxiv.org/abs/2403.03853): the blocks whose "
                        "output is closest in angle to their input)"),
    "angular": ("angular distance", "the angular distance of [Gromov et al. 2024]"
                "(https://arxiv.org/abs/2403.17887) (the contiguous run of blocks whose input and "
                "output are closest in angle)"),
    "last": ("last-n", "the last-n baseline (the deepest unprotected blocks)"),
    "random": ("random", "the seeded random baseline"),
    "sleb": ("SLEB", "SLEB ([Song et al. 2024](https://arxiv.org/abs/2402.09025): blocks removed one "
             "at a time, each time the one whose removal leaves the lowest calibration loss)"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_base_model(base_model: str) -> str | None:
    """The Hub id in `base_model` ("owner/name", optionally followed by a note), else None:
    the Hub rejects front matter whose base_model is not a repo id."""
    first = base_model.split(" ", 1)[0]
    return first if _HUB_ID.match(first) else None


def render_model_card(
    plan: PruningPlan, *, base_model: str, evaluation: Mapping[str, Any] | None = None
) -> str:
    """README.md text with Hub front matter (base_model, tags) and the pruning decision."""
    images = plan.extra.get(IMAGES)
    data = ModelCardData(
        base_model=_hub_base_model(base_model),
        library_name="transformers",
        tags=list(TAGS),
        pipeline_tag="image-text-to-text" if images else "text-generation",
    )
    before, after = plan.num_blocks, len(plan.kept)
    name, how = METHOD_TEXT[plan.config.get("method", "sglp")]
    healing = plan.extra.get("healing")
    sections = [
        f"# {base_model}, depth-pruned with {name} ({after} of {before} blocks)"
        + (" and healed with LoRA" if healing else ""),
        f"This is `{base_model}` with {len(plan.dropped)} of "
        f"its {before} decoder blocks removed by {how}, made with `sglp-llm`. "
        + (
            "The remaining blocks were then fine-tuned with LoRA and the adapter merged into "
            "their weights (see Healing)."
            if healing
            else "The remaining blocks are unchanged; no fine-tuning was applied after pruning."
        ) + (" The model also reads images: its decoder blocks were chosen on text only, and its vision tower "
             "and projector are unchanged." if images else ""),
        _removed_section(plan),
        _chosen_section(plan),
        _segments_section(plan),
        _calibration_section(plan),
        *([healing_section(healing)] if healing else []),
        "## Settings\n\nThe full settings are in `sglp_config.json` and the full report (CKA "
        "matrix, scores, timings) in `sglp_report.json`.\n\n```yaml\n"
        + yaml.safe_dump(plan.config, sort_keys=False).rstrip()
        + "\n```",
        _usage_section(images=images),
    ]
    if evaluation:
        sections.append("## Evaluation\n\n" + _evaluation_table(evaluation))
    body = "\n\n".join(sections) + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def render_healed_card(
    base_model: str, healing: Mapping[str, Any], *, evaluation: Mapping[str, Any] | None = None
) -> str:
    """README.md of a healing output that is no SGLP pruning folder: a LoRA adapter for
    `base_model`, or `base_model` with the adapter merged (`healing["merged"]`)."""
    merged = healing["merged"]
    images = healing.get(IMAGES)
    data = ModelCardData(
        base_model=_hub_base_model(base_model),
        library_name="transformers" if merged else "peft",
        tags=[TAGS[0], "lora"],  # not necessarily pruned: heal takes any model
        pipeline_tag="image-text-to-text" if images else "text-generation",
    )
    sections = [
        f"# {base_model}, with a LoRA adapter merged into its weights" if merged
        else f"# LoRA adapter for {base_model}",
        f"Made with `sglp-llm heal`, the LoRA fine-tune that lets a depth-pruned model's remaining "
        f"blocks make up for the removed ones. Base model: `{base_model}`.",
        healing_section(healing),
        _usage_section("A plain `transformers` checkpoint; neither custom code nor peft is needed.", images)
        if merged
        else _adapter_usage_section(base_model, images),
    ]
    if evaluation:
        sections.append("## Evaluation\n\n" + _evaluation_table(evaluation))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def describe_objective(record: dict[str, Any] | None) -> str:
    """The healing objective of a heal report, in words."""
    if not record or record.get("name") != "distillation":
        why = (record or {}).get("why")
        return "the text's next-token loss" + (f" ({why})" if why else "")
    extras = [f"+ {record[key]:g} × {label}" for key, label in (("next_token_weight", "next-token loss"),
                                                                   ("hidden_weight", "kept blocks' output error"))
              if record.get(key)]
    return " ".join([f"distillation from {record['teacher']} (KL at temperature {record['temperature']:g}, "
                     f"teacher {record['teacher_runs']})", *extras])


def describe_schedule(settings: Mapping[str, Any]) -> str:
    """A heal's learning rate and its schedule, in words (settings saved before schedules existed
    were constant)."""
    schedule = settings.get("lr_schedule", "constant")
    words = f"{settings['learning_rate']:g}" + ("" if schedule == "constant" else f", decaying to 0 ({schedule})")
    warmup = settings.get("warmup_ratio") or 0
    return words + (f" after a warmup over {warmup:.0%} of the steps" if warmup else "")


def healing_section(healing: Mapping[str, Any]) -> str:
    """The LoRA fine-tune of a `heal` report (sglp_llm.heal): data, settings, loss, perplexity."""
    settings = healing["settings"]
    loss, ppl = healing["loss"], healing["perplexity"]
    adapter = healing.get("adapter_dir")
    if healing["merged"]:
        where = "merged into the weights" + (f"; also saved alone in `{adapter}/`" if adapter else "")
    else:
        where = "saved alone (not merged): load it with peft"
    # Reports written before the training was timed have no "seconds": their card leaves the row out.
    timed = [f"| training time | {healing['seconds']:.0f} s |"] if "seconds" in healing else []
    return "\n".join([
        "## Healing",
        "",
        "A short LoRA fine-tune ([Hu et al. 2021](https://arxiv.org/abs/2106.09685)) on ordinary "
        "text, learning the original model's next-token distribution where it was at hand, made with `sglp-llm`; the full record is in `heal_report.json`, the settings in "
        "`heal_config.json`.",
        "",
        "| | |",
        "|---|---|",
        f"| objective | {describe_objective(healing.get('objective'))} |",
        f"| training text | {healing['training_text']} |",
        f"| steps | {settings['steps']} × {settings['batch_size']} windows of {settings['seq_len']} "
        f"tokens ({healing['tokens']:,} tokens; {healing['passes']:.2f} passes over "
        f"{healing['windows']} distinct windows) |",
        f"| learning rate | {describe_schedule(settings)} |",
        f"| LoRA rank / alpha / dropout | {settings['rank']} / {settings['alpha']:g} / {settings['dropout']:g} |",
        f"| target modules | {', '.join(healing['target_modules'])} |",
        *([f"| blocks trained in full | {', '.join(map(str, healing['full_blocks']))} (every weight, at "
           f"{settings['full_learning_rate']:g}; no LoRA in them) |"] if healing.get("full_blocks") else []),
        f"| trainable parameters | {healing['trainable_parameters']:,} |",
        f"| training loss (first → last step) | {loss['first']:.4f} → {loss['last']:.4f} |",
        *timed,
        f"| held-out perplexity (before → after) | {ppl['before']['perplexity']:.4f} → "
        f"{ppl['after']['perplexity']:.4f} ({ppl['after']['n_texts']} texts of {ppl['after']['source']}) |",
        f"| adapter | {where} |",
    ])


def _loading(images: Mapping[str, Any] | None) -> tuple[str, str, str]:
    """(Auto class, preprocessing class, its variable) of a saved model, from its `IMAGES` record."""
    if not images:
        return CAUSAL_LM, "AutoTokenizer", "tokenizer"
    return images["loads_with"], *(("AutoProcessor", "processor") if images["processor"] else ("AutoTokenizer", "tokenizer"))


def _adapter_usage_section(base_model: str, images: Mapping[str, Any] | None = None) -> str:
    loads_with, preprocessing, name = _loading(images)
    if loads_with != CAUSAL_LM:  # peft's Auto classes build causal LMs only: the base first, then the adapter
        return f"""## How to load

```python
from peft import PeftModel
from transformers import {loads_with}, {preprocessing}

base = {loads_with}.from_pretrained("{base_model}", dtype="auto")
model = PeftModel.from_pretrained(base, "{MODEL_ID}")
{name} = {preprocessing}.from_pretrained("{MODEL_ID}")
model = model.merge_and_unload()  # optional: a plain transformers model
```

Replace `{MODEL_ID}` with this folder or its Hub repo id."""
    return f"""## How to load

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{MODEL_ID}", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{MODEL_ID}")
model = model.merge_and_unload()  # optional: a plain transformers model
```

Replace `{MODEL_ID}` with this folder or its Hub repo id; the base model is read from
`adapter_config.json`."""


def _removed_section(plan: PruningPlan) -> str:
    return "\n".join([
        "## What was removed",
        "",
        "| | |",
        "|---|---|",
        f"| blocks before | {plan.num_blocks} |",
        f"| blocks after | {len(plan.kept)} |",
        f"| dropped (original indices) | {_indices(plan.dropped)} |",
        f"| kept (original indices) | {_indices(plan.kept)} |",
        f"| block scores | {plan.score_label()} |",
        f"| layers | `{plan.layers_path}` |",
        "",
        describe(plan.extra.get("verification")),
        "",
        f"![CKA between block outputs, segments boxed, dropped blocks in red]({HEATMAP_NAME})",
    ])


def _chosen_section(plan: PruningPlan) -> str:
    lines = ["## How the blocks were chosen", "", *(f"- {stage}" for stage in stages(plan.config, plan.n_tokens)), ""]
    lines += [f"- block {block}: {why}" for block, why in sorted(chosen_by(plan).items())]
    if kept := kept_for_attention(plan):
        lines.append(f"- {kept}")
    stability = describe_stability(plan.extra.get("stability"))
    if stability:
        lines.append(f"- {stability}")
    folded = plan.extra.get("compensation", {}).get("folded", {})
    lines += [
        f"- compensation folded into block {p} (before removed blocks {f['run'][0]}-{f['run'][1]}): relative "
        f"residual {f['relative_residual']:.3f} on {f['tokens']} calibration tokens (dropped plainly: "
        f"{f['relative_residual_dropped']:.3f})"
        + (f", mean cosine distance {f['cosine_distance']:.4f} (least squares: {f['cosine_distance_least_squares']:.4f})"
           if "cosine_distance" in f else "")
        for p, f in sorted(folded.items(), key=lambda item: int(item[0]))
    ]
    trained = plan.extra.get("recovery", {}).get("trained", {})
    lines += [
        f"- block {k} trained to stand in for removed blocks {r['stands_in_for']}: relative error to {r['target']} "
        f"{r['relative_error_before']:.3f} -> {r['relative_error_after']:.3f} on its first training windows"
        for k, r in sorted(trained.items(), key=lambda item: int(item[0]))
    ]
    return "\n".join(lines)


def _segments_section(plan: PruningPlan) -> str:
    rows = [
        "## Segments",
        "",
        f"| segment | blocks | kept | dropped | {plan.score_kind} per block |",
        "|---|---|---|---|---|",
    ]
    dropped = set(plan.dropped)
    for n, (segment, keep) in enumerate(zip(plan.segments, plan.keep_per_segment)):
        scores = ", ".join(f"{i}: {plan.score_text(i)}" for i in segment)
        gone = [i for i in segment if i in dropped]
        span = f"{segment[0]}–{segment[-1]}" if len(segment) > 1 else str(segment[0])
        rows.append(
            f"| {n} | {span} | {keep} of {len(segment)} | "
            f"{_indices(gone)} | {scores} |"
        )
    return "\n".join(rows)


def _calibration_section(plan: PruningPlan) -> str:
    source = plan.calibration_source or plan.config.get("dataset") or "not recorded"
    fallback = plan.extra.get("calibration_not_sampled")
    why = f"\n- not the model's own samples (the default): {fallback}" if fallback else ""
    digest = plan.extra.get("calibration_sha256")  # a plan before the digest has none
    digest = f"\n- tokens' sha256: `{digest}` (the same text gives the same digest)" if digest else ""
    return (
        "## Calibration\n\n"
        f"- data: {source}\n"
        f"- tokens: {plan.n_tokens:,} in {plan.n_batches} batches{why}{digest}"
    )


def _usage_section(what: str = "A plain `transformers` checkpoint with fewer layers; no custom code is needed.",
                   images: Mapping[str, Any] | None = None) -> str:
    """How to load and evaluate a saved model; `images`: its `IMAGES` record (a model that also
    reads images loads with its processor, and some with AutoModelForImageTextToText)."""
    loads_with, preprocessing, name = _loading(images)
    harness = (
        f"""With [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness):

```bash
lm_eval --model hf --model_args pretrained={MODEL_ID},dtype=auto \\
    --tasks arc_easy,hellaswag,piqa,winogrande --batch_size auto
```

or with this project's wrapper, which runs the same harness:"""
        if loads_with == CAUSAL_LM
        else "lm-evaluation-harness's `hf` model builds causal LMs only; this project's wrapper loads this "
        "model and runs the same harness (`--tasks`) on it, and its perplexity on text:"
    )
    return f"""## How to load

{what}

```python
from transformers import {loads_with}, {preprocessing}

model = {loads_with}.from_pretrained("{MODEL_ID}", dtype="auto")
{name} = {preprocessing}.from_pretrained("{MODEL_ID}")
```

## How to evaluate

{harness}

```bash
sglp-llm eval {MODEL_ID}
```

Replace `{MODEL_ID}` with this folder or its Hub repo id."""


def _evaluation_table(evaluation: Mapping[str, Any]) -> str:
    """A metric -> value mapping is one column; a column -> {metric: value} mapping is several."""
    nested = [isinstance(v, Mapping) for v in evaluation.values()]
    if any(nested) and not all(nested):
        raise ValueError(
            "`evaluation` must map metric -> value (e.g. {'arc_easy/acc': 0.71}) or column -> "
            "{metric: value} (e.g. {'dense': {...}, 'pruned': {...}}), not a mix of both."
        )
    columns = dict(evaluation) if all(nested) else {"value": evaluation}
    metrics = list(dict.fromkeys(m for col in columns.values() for m in col))
    rows = [
        "| metric | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for metric in metrics:
        cells = [_cell(col.get(metric)) for col in columns.values()]
        rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _indices(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) if indices else "none"
