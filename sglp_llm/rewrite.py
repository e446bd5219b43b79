"""Removing decoder blocks so that the result is an ordinary, smaller model of the same class.

Dropping modules from the `ModuleList` is not enough: attention layers index the KV cache with
their `layer_idx`, the forward pass picks masks from per-layer config lists (`layer_types`),
and some families decide a block's MLP type from its index (`mlp_only_layers`,
`first_k_dense_replace`). All of it is rewritten here, and the same code serves the temporary
"skip these blocks" view used for scoring, so the scored network is exactly the saved one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from torch import nn

from .blocks import DecoderBlocks, find_decoder_blocks

LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index")
# config fields holding "blocks with an original index below this value are special"
THRESHOLD_FIELDS = ("first_k_dense_replace", "max_window_layers")
# config fields holding a list of block indices
INDEX_LIST_FIELDS = ("mlp_only_layers",)
# periodic patterns over block indices that a renumbering cannot express
PERIODIC_FIELDS = ("moe_layer_freq", "interleave_moe_layer_step")

SGLP_CONFIG_KEY = "sglp"


class RewriteError(ValueError):
    """The requested set of blocks cannot be removed from this model."""


def kept_blocks(num_blocks: int, dropped: Sequence[int]) -> list[int]:
    """The surviving original indices, after checking `dropped` makes sense."""
    dropped_set = set(dropped)
    if not dropped_set <= set(range(num_blocks)):
        raise RewriteError(
            f"Dropped block indices must lie within 0..{num_blocks - 1}, got {sorted(dropped_set)}."
        )
    if len(dropped_set) == num_blocks:
        raise RewriteError("At least one decoder block must be kept; refusing to drop them all.")
    return [i for i in range(num_blocks) if i not in dropped_set]


def _config_changes(config, kept: list[int], num_blocks: int) -> dict[str, object]:
    """New values for every config field that depends on which blocks exist."""
    changes: dict[str, object] = {"num_hidden_layers": len(kept)}
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == num_blocks and name not in INDEX_LIST_FIELDS:
            changes[name] = type(value)(value[i] for i in kept)
    for name in THRESHOLD_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            changes[name] = sum(1 for i in kept if i < value)
    step = getattr(config, "decoder_sparse_step", None)
    if isinstance(getattr(config, "mlp_only_layers", None), list) and step is not None:
        # Qwen-MoE rule: sparse iff idx not in mlp_only_layers and (idx + 1) % step == 0.
        # Renumbering breaks the period, so list the dense blocks explicitly instead.
        has_experts = (getattr(config, "num_experts", 0) or 0) > 0
        dense = [
            new
            for new, old in enumerate(kept)
            if old in config.mlp_only_layers or not (has_experts and (old + 1) % step == 0)
        ]
        changes.update(decoder_sparse_step=1, mlp_only_layers=dense)
    for name in PERIODIC_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            raise RewriteError(
                f"This model's config sets {name}={value}: which blocks are special follows a "
                "period over block indices that cannot be kept after removing blocks. Depth "
                "pruning of this family is not supported yet; please open an issue with the "
                "model id."
            )
    return changes


def _apply(blocks: DecoderBlocks, kept: list[int]) -> Callable[[], None]:
    """Rewrite model and config in place for `kept`; return a function that undoes it."""
    num_blocks = len(blocks.layers)
    config = blocks.config
    changes = _config_changes(config, kept, num_blocks)
    old_config = {name: getattr(config, name, None) for name in changes}
    old_indices: list[tuple[nn.Module, str, int]] = []
    for new_index, old_index in enumerate(kept):
        for module in blocks.layers[old_index].modules():
            for name in LAYER_INDEX_ATTRIBUTES:
                if isinstance(getattr(module, name, None), int):
                    old_indices.append((module, name, getattr(module, name)))
                    setattr(module, name, new_index)
    setattr(blocks.parent, blocks.attribute, nn.ModuleList(blocks.layers[i] for i in kept))
    for name, value in changes.items():
        setattr(config, name, value)

    def undo() -> None:
        for name, value in old_config.items():
            setattr(config, name, value)
        for module, name, value in old_indices:
            setattr(module, name, value)
        setattr(blocks.parent, blocks.attribute, blocks.layers)

    return undo


def remove_blocks(model: nn.Module, dropped: Sequence[int], *, layers_path: str | None = None) -> nn.Module:
    """Remove the `dropped` blocks (original indices) from `model`, in place, and return it.

    The kept original indices are recorded in `config.sglp` so the lineage survives saving.
    """
    blocks = find_decoder_blocks(model, layers_path)
    num_blocks = len(blocks.layers)
    kept = kept_blocks(num_blocks, dropped)
    previous = getattr(blocks.config, SGLP_CONFIG_KEY, None) or {}
    # a model pruned twice keeps indices relative to the very first model
    original_count = previous.get("original_num_hidden_layers", num_blocks)
    original = previous.get("kept_layers", list(range(num_blocks)))
    kept_original = [original[i] for i in kept]
    _apply(blocks, kept)
    setattr(
        blocks.config,
        SGLP_CONFIG_KEY,
        {
            "kept_layers": kept_original,
            "dropped_layers": sorted(set(range(original_count)) - set(kept_original)),
            "original_num_hidden_layers": original_count,
        },
    )
    return model


@contextmanager
def skip_blocks(model: nn.Module, dropped: Sequence[int], *, layers_path: str | None = None) -> Iterator[nn.Module]:
    """Temporarily run `model` without the `dropped` blocks; everything is restored on exit."""
    blocks = find_decoder_blocks(model, layers_path)
    undo = _apply(blocks, kept_blocks(len(blocks.layers), dropped))
    try:
        yield model
    finally:
        undo()
