"""Writing a pruned model's weights straight from its source safetensors files.

A model whose decoder blocks stay on disk (`offload.load_with_blocks_on_disk`) never has all
its weights in memory, so transformers' `save_pretrained` cannot write it. Here the kept blocks'
tensors are copied from the source files under their new indices, one shard at a time, so
pruning a 70B model needs no more memory than one shard.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as INDEX_NAME
from transformers.utils import SAFE_WEIGHTS_NAME as WEIGHTS_NAME

from ..model.offload import BLOCK_LOADER_ATTRIBUTE, SafetensorsBlocks, read_tensors

# a shard is held in memory while it is written, so it is kept small beside the model's
# resident embeddings and head (transformers writes 5 GB shards from a model held whole)
MAX_SHARD_BYTES = 2 * 2**30


def renamed_tensors(
    names: Sequence[str], layers_path: str, kept: Sequence[int]
) -> dict[str, str]:
    """Source tensor name -> name in the pruned model: tensors of dropped blocks are left out, those
    of kept blocks renumbered (the i-th kept block becomes block i), all others keep their name."""
    new_index = {old: new for new, old in enumerate(kept)}
    block = re.compile(re.escape(layers_path) + r"\.(\d+)\.(.+)")
    renamed = {}
    for name in names:
        match = block.fullmatch(name)
        if match is None:
            renamed[name] = name
        elif int(match.group(1)) in new_index:
            renamed[name] = f"{layers_path}.{new_index[int(match.group(1))]}.{match.group(2)}"
    return renamed


def _shapes(files: dict[str, Path], names: Sequence[str], stored: Mapping[str, str]) -> dict[str, list[int]]:
    """Each tensor's shape, read from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    found = {}
    for file in sorted({files[name] for name in names}):
        with safe_open(file, framework="pt") as f:
            for name in names:
                if files[name] == file:
                    found[name] = f.get_slice(stored.get(name, name)).get_shape()
    return found


def save_model(model: nn.Module, folder: Path, kept: Sequence[int]) -> None:
    """Save the pruned model's config and weights into `folder`: with transformers'
    `save_pretrained`, or for a model whose blocks are on disk, from its source files."""
    loader = getattr(model, BLOCK_LOADER_ATTRIBUTE, None)
    if not isinstance(loader, SafetensorsBlocks):
        model.save_pretrained(folder)
        return
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_pruned_weights(folder, model, loader.files, loader.layers_path, kept, stored=loader.stored)


def write_pruned_weights(
    folder: Path,
    model: nn.Module,
    files: dict[str, Path],
    blocks_prefix: str,
    kept: Sequence[int],
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    stored: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write the weights of `model` (already pruned to the `kept` source blocks) into `folder`,
    reading every tensor from the source checkpoint `files` (the model's name -> safetensors file;
    the blocks' tensors named `blocks_prefix`.<index>.*; `stored`: a tensor's name in its file
    where it differs) and casting it to the dtype of the model's tensor of that name, written
    under the model's names. Sharded like transformers does, with an index, when the weights
    exceed `max_shard_bytes`. Returns the files written."""
    from safetensors.torch import save_file

    renamed = renamed_tensors(list(files), blocks_prefix, kept)
    targets = dict(model.state_dict(keep_vars=True))
    missing = sorted(set(targets) - set(renamed.values()) - _tied_names(targets))
    if missing:
        raise ValueError(
            f"The source checkpoint has no tensors for {missing[:3]} of the pruned model, so its "
            "weights cannot be copied from it; load the model whole and save it with save_pretrained."
        )

    def dtype(source: str) -> torch.dtype | None:
        target = targets.get(renamed[source])
        return target.dtype if target is not None else None

    shapes = _shapes(files, list(renamed), stored or {})
    shards: list[list[str]] = [[]]
    size = 0
    for source in renamed:
        nbytes = (dtype(source) or torch.float32).itemsize * math.prod(shapes[source])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += nbytes
    names = (
        [WEIGHTS_NAME] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        tensors = {}
        for source in shard:
            held = targets.get(renamed[source])
            if held is not None and not held.is_meta:  # in memory already (embeddings, head, norms)
                tensor = held.detach().cpu()
            else:  # a block's tensor, read one at a time and cast to the model's dtype
                tensor = read_tensors(files, [source], torch.device("cpu"), stored)[source]
                wanted = dtype(source)
                if wanted is not None and tensor.is_floating_point() and wanted.is_floating_point:
                    tensor = tensor.to(wanted)
            tensors[renamed[source]] = tensor.contiguous()
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, folder / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [folder / name for name in names] + [folder / INDEX_NAME]
    return [folder / WEIGHTS_NAME]


def _tied_names(state: dict[str, torch.Tensor]) -> set[str]:
    """State-dict names that share their tensor with an earlier name (tied embeddings): the source
    checkpoint may store them once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in state.items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied
