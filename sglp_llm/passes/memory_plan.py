"""The peak memory of an analysis, predicted from the model's config alone (a meta-device model:
no weight is read), for the mode a run uses: the model whole in memory, sequential onloading from
CPU memory, or blocks read from disk. `sglp-llm analyze --plan-memory` prints it before anything
is loaded, so a user can pick a mode, a token budget and a device that fit.

Each phase of the run (statistics forward, replay of the statistics, backward, loss check,
writing) holds some of the parts below at once; a device's peak is its largest phase. The parts
are counted from the config and the settings: parameters by dtype, hidden states as tokens ×
hidden size × dtype, attention scores of eager attention (an upper bound for SDPA and flash), the
head's logits a chunk at a time (sglp_llm.passes.head), and the interpreter with torch and transformers
(RUNTIME_BYTES, measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .head import MAX_LOGITS_BYTES, subset_columns
from ..model.shards import MAX_SHARD_BYTES

# the interpreter, torch and transformers before any model exists (benchmarks/results/scale.md)
RUNTIME_BYTES = 400 * 2**20
GIB = 2**30


@dataclass
class MemoryPlan:
    """Predicted bytes per device: each phase's parts, and the peak (the largest phase)."""

    mode: str
    phases: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # phase -> device -> part -> bytes

    def add(self, phase: str, device: str, part: str, size: float) -> None:
        self.phases.setdefault(phase, {}).setdefault(device, {})[part] = int(size)

    def peak(self) -> dict[str, int]:
        devices = {d for parts in self.phases.values() for d in parts}
        return {d: max(sum(p.get(d, {}).values()) for p in self.phases.values()) for d in sorted(devices)}

    def peak_phase(self, device: str) -> str:
        return max(self.phases, key=lambda phase: sum(self.phases[phase].get(device, {}).values()))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "peak_bytes": self.peak(), "phases": self.phases}

    def text(self) -> str:
        lines = [f"Memory plan ({self.mode}), predicted from the config, no weights read:"]
        for device, peak in self.peak().items():
            phase = self.peak_phase(device)
            lines.append(f"  {device}: peak {peak / GIB:.2f} GiB, during {phase}")
            parts = self.phases[phase][device]
            for part, size in sorted(parts.items(), key=lambda item: -item[1]):
                lines.append(f"    {part}: {size / GIB:.2f} GiB")
        return "\n".join(lines)


def meta_model(model_config: Any, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from ..model.auto_class import auto_model_class

    with init_empty_weights():
        model = auto_model_class(model_config).from_config(model_config, dtype=dtype)
    model.tie_weights()  # tied embeddings count once, as in the loaded model
    return model


def plan_memory(
    model_config: Any,
    config: Any,
    *,
    dtype: torch.dtype,
    source_dtype: torch.dtype | None = None,
    blocks_on_disk: bool = False,
    execution_device: str = "cpu",
    write: bool = False,
) -> MemoryPlan:
    """The memory plan of analysing (and with `write`, pruning) a model of `model_config` (a
    transformers config) with the SGLPConfig `config`, computing in `dtype`; `source_dtype`: the
    checkpoint's, when blocks are read from disk and cast; `execution_device`: where blocks run
    (onload_device, or the model's device)."""
    from ..model.blocks import find_decoder_blocks, text_config

    model = meta_model(model_config, dtype)
    blocks = find_decoder_blocks(model, config.layers_path)
    text = text_config(model)
    size = torch.tensor([], dtype=dtype).element_size()
    source_size = torch.tensor([], dtype=source_dtype or dtype).element_size()
    block_params = [sum(p.numel() for p in block.parameters()) for block in blocks.layers]
    all_params = sum(p.numel() for p in model.parameters())  # tied weights once
    rest = (all_params - sum(block_params)) * size
    one_block = max(block_params) * size
    num_blocks, hidden = len(blocks.layers), text.hidden_size
    vocab = getattr(text, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
    heads = getattr(text, "num_attention_heads", 1)
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden

    sequential = config.offload == "sequential"
    mode = "blocks on disk" if blocks_on_disk else "sequential onloading" if sequential else "whole model in memory"
    plan = MemoryPlan(mode)
    host, run = "cpu", execution_device
    batch, seq = config.batch_size, config.seq_len
    tokens = config.n_samples * seq
    state = tokens * hidden * size  # one block position's hidden states, every calibration batch

    def activations(n_tokens: int, rows: int) -> float:
        """Inside one block: q, k, v, o and the residual; eager attention scores in float32 and
        their softmax; the MLP's gate, up and product."""
        per_row = n_tokens / rows
        return n_tokens * hidden * size * 5 + rows * heads * per_row**2 * (4 + size) + n_tokens * intermediate * size * 3

    def head(rows: int, per_row: int) -> float:
        """One chunk of logits: in the model's dtype, in float32, and the float32 log-softmax."""
        chunk = min(MAX_LOGITS_BYTES, rows * per_row * vocab * 4)
        return chunk * (2 + size / 4)

    def weights(phase: str, block: bool = True) -> None:
        plan.add(phase, host, "interpreter, torch, transformers", RUNTIME_BYTES)
        if blocks_on_disk:
            plan.add(phase, run, "embeddings, final norm, head", rest)
            if not block:
                return
            plan.add(phase, run, "one decoder block", one_block)
            if source_size != size:  # read in the checkpoint's dtype, then cast
                plan.add(phase, run, "one block as read, before the cast", max(block_params) * source_size)
        elif sequential:
            plan.add(phase, host, "whole model (CPU memory)", all_params * size)
            if run != host:
                plan.add(phase, run, "one decoder block", one_block)
        else:
            plan.add(phase, run, "whole model", all_params * size)

    needs_backward = config.needs_backward
    if blocks_on_disk and source_size != size:  # the rest is read one tensor at a time and cast
        plan.add("loading", host, "interpreter, torch, transformers", RUNTIME_BYTES)
        plan.add("loading", run, "embeddings, final norm, head", rest)
        largest = max(p.numel() for name, p in model.named_parameters() if not name.startswith(blocks.path + "."))
        plan.add("loading", run, "one of them as read, before the cast", largest * source_size)
    weights("statistics forward")
    if sequential:
        spill = _spills(config, (num_blocks + 1) * state)
        plan.add("statistics forward", host, "hidden states of every block" if not spill else
                 "hidden states of two block positions (the rest on disk)", (num_blocks + 1) * state if not spill else 2 * state)
        masks = config.n_samples * seq * seq * size * (2 if getattr(text, "sliding_window", None) else 1)
        plan.add("statistics forward", host, "recorded block calls (masks)", masks)
        plan.add("statistics forward", run, "activations of one block (all batches' rows, one batch at a time)",
                 activations(batch * seq, batch))
        weights("statistics replay")
        plan.add("statistics replay", host, "hidden states", (num_blocks + 1) * state if not spill else 2 * batch * seq * hidden * size)
        plan.add("statistics replay", host, "CKA Gram matrices of one batch",
                 num_blocks * batch * seq * config.cka_minibatch_tokens * 8)
        if needs_backward:
            weights("statistics backward")
            plan.add("statistics backward", host, "hidden states", (num_blocks + 1) * state if not spill else 3 * state)
            plan.add("statistics backward", host, "gradients at one block position", tokens * hidden * size)
            plan.add("statistics backward", run, "activations of one block, kept for its backward",
                     2 * activations(batch * seq, batch))
    else:
        plan.add("statistics forward", run, "activations of one block", activations(batch * seq, batch))
        if needs_backward and not config.gradient_checkpointing:
            plan.add("statistics forward", run, "activations of every block, kept for the backward",
                     num_blocks * activations(batch * seq, batch))
        plan.add("statistics forward", run, "logits of one batch", head(batch, seq))

    # the statistics pass keeps them for the loss check: block by block, those of the stored
    # states (a copy only of states spilled to disk), from the replay on
    if config.keeps_original_outputs and (not sequential or spill):
        kept = num_blocks * math.ceil(min(config.loss_tokens, tokens) / seq) * seq * hidden * size
        for phase in ("statistics replay", "statistics backward") if sequential else ("statistics forward",):
            if phase in plan.phases:
                plan.add(phase, host if sequential else run, "block outputs on the loss check's batches, kept for it", kept)

    if config.method == "sglp" and config.scoring == "loss" or config.method == "sleb":
        loss_tokens = min(config.loss_tokens, tokens) if config.method == "sglp" else tokens
        loss_state = math.ceil(loss_tokens / seq) * seq * hidden * size
        weights("loss check")
        # kept on the CPU block by block; in the model's own forward, where the blocks run
        plan.add("loss check", host if sequential else run, "kept block outputs of the pruned network so far",
                 num_blocks * loss_state)
        plan.add("loss check", run, "hidden states in flight (one block position)", 2 * loss_state)
        plan.add("loss check", run, "activations of one block", activations(batch * seq, batch))
        plan.add("loss check", run, "one chunk of the head's logits", head(batch, seq))
        linear_head = isinstance(model.get_output_embeddings(), torch.nn.Linear)
        vocabulary = config.resolve_loss_vocabulary(linear_head, vocab) if config.method == "sglp" else 0
        if vocabulary:  # each loss batch's and each screen's narrowed head, kept while the search runs
            narrowed = subset_columns(vocabulary, batch * (seq - 1), vocab) * hidden * size
            plan.add("loss check", run, "the head narrowed to each loss batch's vocabulary subset",
                     (math.ceil(loss_tokens / (batch * seq)) + 2) * narrowed)

    if config.compensation != "none":  # the block-by-block fit (sglp_llm.recovery.compensate), where blocks run
        weights("compensation fit")
        runs = config.resolve_drop(num_blocks)  # at most one removed run per dropped block
        streams = 1 if config.compensation_fit == "original" else 2
        plan.add("compensation fit", run, "hidden states of the original network" + (
            " and the pruned one" if streams == 2 else "") + ", every calibration batch", streams * state)
        plan.add("compensation fit", run, "M and Y of the run being fitted, every calibration batch", 2 * state)
        plan.add("compensation fit", host, "recorded block calls (masks)", config.n_samples * seq * seq * size * (
            2 if getattr(text, "sliding_window", None) else 1))
        plan.add("compensation fit", run, "activations of one block", activations(batch * seq, batch))
        plan.add("compensation fit", host, "Gram sums of one run and the maps of every run (float64)",
                 (2 + runs) * hidden * hidden * 8)
        if config.compensation == "cosine":
            plan.add("compensation fit", run, "M and h_b - Y of the fitted tokens (float32, cosine)", 2 * tokens * hidden * 4)

    if write and blocks_on_disk:
        weights("writing the pruned model", block=False)
        # the blocks' tensors of one output shard, read one at a time and cast (the embeddings
        # and head are written from memory)
        kept_blocks = (num_blocks - config.resolve_drop(num_blocks)) * one_block
        plan.add("writing the pruned model", host, "one output shard of block tensors",
                 min(MAX_SHARD_BYTES, kept_blocks) + max(block_params) / 3 * source_size)
    return plan


def _spills(config: Any, total: int) -> bool:
    from .hidden_states import spills

    return spills(config.hidden_states, total)
