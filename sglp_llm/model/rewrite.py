"""Removing decoder blocks so that the result is an ordinary, smaller model of the same class.

Dropping modules from the `ModuleList` is not enough: attention layers index the KV cache with
their `layer_idx`, the forward pass picks masks from per-layer config lists (`layer_types`),
and some families decide a block's MLP type from its index (`mlp_only_layers`,
`first_k_dense_replace`). All of it is rewritten here, and the same code serves the temporary
"skip these blocks" view used for scoring, so the scored network is exactly the saved one.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .blocks import DecoderBlocks
from .handle import ModelHandle

LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index")
# config fields holding "blocks with an original index below this value are special"
THRESHOLD_FIELDS = ("first_k_dense_replace", "max_window_layers")
# config lists whose values are block indices (moe_layers, mlp_only_layers, hybrid_layer_ids, ...):
# remapped to the new indices, never sliced
INDEX_LIST_NAME = re.compile(r"(^|_)(layers|layer_ids|layer_indices|layer_idx|layers_idx)$")
# config lists that are never per block, whatever their length: token ids (a 3-token eos on a
# 3-block model, bad_words_ids, ...) and the class names
NOT_PER_BLOCK_NAME = re.compile(r"(_ids?|^architectures)$")
# periodic patterns over block indices that a renumbering cannot express
PERIODIC_FIELDS = ("moe_layer_freq", "interleave_moe_layer_step")

SGLP_CONFIG_KEY = "sglp"


class RewriteError(ValueError):
    """The requested set of blocks cannot be removed from this model."""


def _loadable_source(model: nn.Module) -> str | None:
    """The directory (made absolute) or Hub id `model` was loaded from, if it says."""
    name = getattr(model, "name_or_path", None) or ""
    if not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


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


def is_index_list(name: str, value: object, num_blocks: int) -> bool:
    """Whether a config field lists block indices: named so, and strictly increasing valid indices."""
    if not INDEX_LIST_NAME.search(name) or not isinstance(value, (list, tuple)) or not value:
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_blocks for v in value):
        return False
    return all(a < b for a, b in zip(value, value[1:]))


def remap_index_list(value: Sequence[int], kept: Sequence[int]) -> list[int]:
    """The new indices of the kept blocks that `value` lists (dropped ones leave the list)."""
    listed = set(value)
    return [new for new, old in enumerate(kept) if old in listed]


def is_per_block(name: str, value: object, num_blocks: int) -> bool:
    """Whether a config list has one entry per block (sliced with the blocks)."""
    return (
        isinstance(value, (list, tuple)) and len(value) == num_blocks
        and not NOT_PER_BLOCK_NAME.search(name) and not is_index_list(name, value, num_blocks)
    )


def _config_changes(config, kept: list[int], num_blocks: int, count_field: str) -> dict[str, object]:
    """New values for every config field that depends on which blocks exist."""
    changes: dict[str, object] = {count_field: len(kept)}
    for name, value in vars(config).items():
        if is_index_list(name, value, num_blocks):
            changes[name] = type(value)(remap_index_list(value, kept))
        elif is_per_block(name, value, num_blocks):
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
    layers = blocks.layers
    num_blocks = len(layers)
    config = blocks.config
    changes = _config_changes(config, kept, num_blocks, blocks.count_field)
    old_config = {name: getattr(config, name, None) for name in changes}
    old_indices: list[tuple[nn.Module, str, int]] = []
    for new_index, old_index in enumerate(kept):
        for module in layers[old_index].modules():
            for name in LAYER_INDEX_ATTRIBUTES:
                if isinstance(getattr(module, name, None), int):
                    old_indices.append((module, name, getattr(module, name)))
                    setattr(module, name, new_index)
    setattr(blocks.parent, blocks.attribute, nn.ModuleList(layers[i] for i in kept))
    for name, value in changes.items():
        setattr(config, name, value)

    def undo() -> None:
        for name, value in old_config.items():
            setattr(config, name, value)
        for module, name, value in old_indices:
            setattr(module, name, value)
        setattr(blocks.parent, blocks.attribute, layers)

    return undo


def _constants(block: nn.Module) -> dict[str, object]:
    """The plain values (numbers, strings) a block's modules hold: what their constructors derived
    from the config and the block index, which a reloaded model derives again."""
    return {
        f"{prefix}.{name}".lstrip("."): value
        for prefix, module in block.named_modules()
        for name, value in vars(module).items()
        if isinstance(value, (int, float, str)) and not name.startswith("_")
        and name not in LAYER_INDEX_ATTRIBUTES and name != "training"
    }


def _shapes(block: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in block.named_parameters()}


def _rebuilt(block: nn.Module, config, index: int) -> nn.Module | None:
    """A fresh block of the same class for `config` at `index`, on the meta device (no memory),
    as `from_pretrained` would build it; None if its constructor takes more than config and index."""
    parameters = list(inspect.signature(type(block).__init__).parameters.values())[1:]
    index_name = next((p.name for p in parameters if p.name in LAYER_INDEX_ATTRIBUTES), None)
    required = [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not required or set(required[1:]) - {index_name}:
        return None
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return type(block)(config, **({index_name: index} if index_name else {}))
    except Exception:  # noqa: BLE001 - a constructor we cannot call: the reload check decides
        return None


def _differences(block: nn.Module, config, index: int) -> dict[str, tuple[object, object]]:
    """Constants of `block` that a block rebuilt at `index` from `config` would not have."""
    fresh = _rebuilt(block, config, index)
    if fresh is None:
        return {}
    old_shapes, new_shapes = _shapes(block), _shapes(fresh)
    if old_shapes != new_shapes:
        name = next(n for n in sorted(old_shapes.keys() | new_shapes.keys()) if old_shapes.get(n) != new_shapes.get(n))
        raise RewriteError(
            f"This family decides each block's structure from its index: the block moved to index {index} "
            f"would be rebuilt differently ({name}: {old_shapes.get(name, 'absent')} here, "
            f"{new_shapes.get(name, 'absent')} rebuilt), so no config describes the pruned stack. Depth "
            f"pruning of {type(block).__name__} stacks is not supported."
        )
    old, new = _constants(block), _constants(fresh)

    def same(a: object, b: object) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
        return a == b

    return {name: (value, new.get(name)) for name, value in old.items() if not same(value, new.get(name))}


def _keep_block_constants(blocks: DecoderBlocks, kept: list[int]) -> dict[str, list[float]]:
    """Make the rewritten config rebuild every kept block as it is. A block constant that scales
    with the block count (MiniCPM3: `scale_depth / sqrt(num_hidden_layers)`) is kept by rescaling
    the one float config field that restores it exactly; anything else (a constant derived from
    the block's index, or with no such field) is refused. Returns field -> [old, new] changed."""
    compensated: dict[str, list[float]] = {}
    try:
        _rebuild_as_is(blocks, kept, compensated)
    except RewriteError:
        for name, (value, _) in compensated.items():  # the caller undoes the rest of the rewrite
            setattr(blocks.config, name, value)
        raise
    return compensated


def _rebuild_as_is(blocks: DecoderBlocks, kept: list[int], compensated: dict[str, list[float]]) -> None:
    """`_keep_block_constants`' search; the fields it rescales go into `compensated`."""
    config = blocks.config
    for index, block in enumerate(blocks.layers):
        differences = _differences(block, config, index)
        if not differences:
            continue
        ratios = {
            old / new for old, new in differences.values()
            if isinstance(old, float) and isinstance(new, float) and new != 0
        }
        field = None
        if len(ratios) == 1 and len(differences) == len([v for v in differences.values() if isinstance(v[0], float)]):
            (ratio,) = ratios
            for name, value in vars(config).items():
                if name in compensated or not isinstance(value, float) or value == 0 or not math.isfinite(value):
                    continue
                setattr(config, name, value * ratio)
                if not _differences(block, config, index):
                    field = name
                    compensated[name] = [value, value * ratio]
                    break
                setattr(config, name, value)
        if field is None:
            name, (old, new) = next(iter(differences.items()))
            raise RewriteError(
                f"Block {kept[index]} of this {type(block).__name__} holds {name}={old!r}, derived from "
                f"its index or the block count; a reloaded pruned model would rebuild it as {new!r} "
                "and compute something else, and no config field restores it. Depth pruning of this "
                "family is not supported."
            )
    # a field rescaled for a later block must not have changed an earlier one
    if compensated and any(_differences(block, config, i) for i, block in enumerate(blocks.layers)):
        raise RewriteError(
            f"Rescaling the config's {', '.join(compensated)} cannot rebuild every kept block of this "
            "model as it is; depth pruning of this family is not supported."
        )


def _check_config(config) -> None:
    """The rewritten config must pass its own class's validation, as saving will require."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as error:  # noqa: BLE001 - any validation failure: the config cannot be saved
        cause = getattr(error, "__cause__", None) or error
        raise RewriteError(
            f"The rewritten {type(config).__name__} fails its own validation ({str(cause).strip().splitlines()[-1]}): "
            "this family's config cannot describe the pruned stack. Depth pruning of it is not supported."
        ) from error


def remove_blocks(model: nn.Module | ModelHandle, dropped: Sequence[int]) -> nn.Module:
    """Remove the `dropped` blocks (original indices) from `model`, in place, and return it.

    The kept original indices are recorded in `config.sglp` so the lineage survives saving.
    """
    removing_blocks(model, dropped)
    return ModelHandle.of(model).model


def removing_blocks(model: nn.Module | ModelHandle, dropped: Sequence[int]) -> Callable[[], None]:
    """`remove_blocks`, returning a function that puts the model back as it was (a rewrite that
    fails verification is undone)."""
    handle = ModelHandle.of(model)
    blocks = handle.blocks
    num_blocks = len(blocks.layers)
    kept = kept_blocks(num_blocks, dropped)
    had_lineage = hasattr(blocks.config, SGLP_CONFIG_KEY)
    previous = getattr(blocks.config, SGLP_CONFIG_KEY, None)
    # a model pruned twice keeps indices relative to the very first model
    original_count = (previous or {}).get("original_num_hidden_layers", num_blocks)
    original = (previous or {}).get("kept_layers", list(range(num_blocks)))
    kept_original = [original[i] for i in kept]
    undo_rewrite = _apply(blocks, kept)
    try:
        _check_config(blocks.config)
        compensated = _keep_block_constants(blocks, kept)
    except BaseException:
        undo_rewrite()
        raise
    lineage = {
        "kept_layers": kept_original,
        "dropped_layers": sorted(set(range(original_count)) - set(kept_original)),
        "original_num_hidden_layers": original_count,
    }
    source = (previous or {}).get("source_model") or _loadable_source(handle.model)
    if source:  # where the original can be loaded again: the teacher when healing distils
        lineage["source_model"] = source
    if compensated:
        lineage["compensated_config"] = compensated
    setattr(blocks.config, SGLP_CONFIG_KEY, lineage)

    def undo() -> None:
        for name, (value, _) in compensated.items():
            setattr(blocks.config, name, value)
        undo_rewrite()
        if had_lineage:
            setattr(blocks.config, SGLP_CONFIG_KEY, previous)
        else:
            delattr(blocks.config, SGLP_CONFIG_KEY)

    return undo


@contextmanager
def skip_blocks(model: nn.Module | ModelHandle, dropped: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run `model` without the `dropped` blocks; everything is restored on exit."""
    handle = ModelHandle.of(model)
    undo = _apply(handle.blocks, kept_blocks(len(handle.layers), dropped))
    try:
        yield handle.model
    finally:
        undo()
