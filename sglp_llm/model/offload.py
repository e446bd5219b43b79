"""Where a decoder block's weights are while it is not running, and how it gets onto the execution
device: in place (in memory or spread by a device map), moved from CPU memory (`MoveBlocks`), or read
from a safetensors checkpoint on disk (`SafetensorsBlocks`, `load_with_blocks_on_disk`). The
block-by-block passes (sglp_llm.passes.sequential) run each block between `onload` and `offload`.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn
from safetensors.torch import save_file
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .blocks import find_decoder_blocks

# a model carrying a loader under this attribute (see `load_with_blocks_on_disk`) is run with it
BLOCK_LOADER_ATTRIBUTE = "sglp_block_loader"


class BlockLoader(Protocol):
    """Brings a decoder block onto the execution device before it runs and releases it after."""

    def onload(self, index: int, block: nn.Module, device: torch.device) -> None: ...

    def offload(self, index: int, block: nn.Module) -> None: ...


class InPlace:
    """The loader for a model in memory or spread by a device map: each block runs where it is."""

    def onload(self, index: int, block: nn.Module, device: torch.device) -> None:
        pass

    def offload(self, index: int, block: nn.Module) -> None:
        pass


class MoveBlocks:
    """The default loader, for a model held in (CPU) memory: move the block to the execution
    device, and back to where it was."""

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def onload(self, index: int, block: nn.Module, device: torch.device) -> None:
        tensors = [*block.parameters(), *block.buffers()]
        if any(t.is_meta for t in tensors):
            raise ValueError(
                f"Decoder block {index} has weights on the meta device (not loaded), so it cannot "
                "be moved to run. Load the model with sglp_llm.model.offload.load_with_blocks_on_disk, "
                "or pass a BlockLoader that loads the block's weights."
            )
        self._home[index] = tensors[0].device if tensors else device
        block.to(device)

    def offload(self, index: int, block: nn.Module) -> None:
        block.to(self._home.pop(index))


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a checkpoint (single file or sharded with an index)."""
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SAFE_WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(
            f"No safetensors checkpoint in {str(directory)!r} (model.safetensors or "
            "model.safetensors.index.json); save the model with save_pretrained first."
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_tensors(files: dict[str, Path], names: Sequence[str], device: torch.device,
                 stored: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors `names` (the model's names) from their files; `stored`: the name a tensor has
    in its file where the model calls it otherwise (see `model_names`)."""
    from safetensors import safe_open

    stored = stored or {}
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({files[name] for name in names}):
        with safe_open(file, framework="pt", device=str(device)) as f:
            tensors.update({name: f.get_tensor(stored.get(name, name)) for name in names if files[name] == file})
    return tensors


def model_names(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the model's name for it, as `from_pretrained` renames on load (the
    older names under which models that also read images are saved, e.g. LLaVA's
    `language_model.model.`). Tensors that transformers converts on load (fused MoE experts) keep
    their name, which the model then lacks: reading from disk does not convert."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without load-time renaming
        return {name: name for name in names}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    renamed = {}
    for name in names:
        new, converted_by = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        renamed[name] = name if converted_by else new
    return renamed


def _swap_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Put `tensor` in place of the parameter or buffer `name` of `module`; returns the old one."""
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, attribute)
    if isinstance(old, nn.Parameter) and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor.to(old.dtype), requires_grad=old.requires_grad)
    if attribute in owner._parameters:
        owner._parameters[attribute] = tensor
    else:
        owner._buffers[attribute] = tensor.to(old.dtype)
    return old


class SafetensorsBlocks:
    """Reads each block's weights from a safetensors checkpoint when it runs and drops them
    afterwards, so that only one block's weights are ever in memory. The block's own (meta)
    tensors are put back on offload: the model's parameters and their flags stay the same objects.
    """

    def __init__(self, files: Mapping[str, Path], layers_path: str, renamed: Mapping[str, str] | None = None) -> None:
        """`files`: the checkpoint's tensor name -> safetensors file (`weight_files`); `renamed`:
        checkpoint name -> the model's name where they differ (`model_names`). `self.files` is keyed
        by the model's names, and `stored` keeps each renamed tensor's name in its file."""
        renamed = renamed or {}
        self.files = {renamed.get(name, name): file for name, file in files.items()}
        self.stored = {new: old for old, new in renamed.items() if new != old}
        self.layers_path = layers_path
        self._skeleton: dict[int, dict[str, torch.Tensor]] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None

    def onload(self, index: int, block: nn.Module, device: torch.device) -> None:
        prefix = f"{self.layers_path}.{index}."
        names = [name for name in self.files if name.startswith(prefix)]
        loaded = read_tensors(self.files, names, device, self.stored)
        self._skeleton[index] = {
            name[len(prefix):]: _swap_tensor(block, name[len(prefix):], tensor) for name, tensor in loaded.items()
        }
        missing = [name for name, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if missing:
            self.offload(index, block)
            raise ValueError(
                f"The checkpoint has no weights for {missing} of decoder block {index} (looked for "
                f"names starting with {prefix!r}); its tensor names must match the model's."
            )

    def offload(self, index: int, block: nn.Module) -> None:
        for name, skeleton in self._skeleton.pop(index).items():
            _swap_tensor(block, name, skeleton)

    def replace_block(self, index: int, block: nn.Module) -> Callable[[], None]:
        """From now on read block `index` as `block` holds it (e.g. after training it): its weights
        go to a scratch checkpoint that lives as long as this loader, which the loader and the
        writing of the pruned model (it copies each tensor from `files`) then read. Returns the
        undo, which reads the original checkpoint again."""
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="sglp-replaced-blocks-")
        prefix = f"{self.layers_path}.{index}."
        tensors = {prefix + name: t.detach().cpu().contiguous() for name, t in block.state_dict().items()
                   if prefix + name in self.files}
        file = Path(self._scratch.name) / f"block-{index}-{len(os.listdir(self._scratch.name))}.safetensors"
        save_file(tensors, file)
        old_files = {name: self.files[name] for name in tensors}
        old_stored = {name: self.stored.pop(name) for name in tensors if name in self.stored}  # saved under the model's names
        self.files.update({name: file for name in tensors})

        def undo() -> None:
            self.files.update(old_files)
            self.stored.update(old_stored)

        return undo


def _refuse_unloaded(block: nn.Module, args: tuple) -> None:
    """A pre-hook on the blocks of `load_with_blocks_on_disk`: a block called while its weights
    are still on disk means something runs the whole network, which needs every block at once."""
    if any(p.is_meta for p in block.parameters()):
        raise RuntimeError(
            "This model's decoder blocks are on disk (load_with_blocks_on_disk): with "
            "offload=\"sequential\" the statistics pass, the loss check and SLEB read them one at a "
            "time, but the subset search (scoring \"subset\") runs the whole network with gradients "
            "and needs the model loaded whole; use the default loss check or scoring=\"block\"."
        )


def load_with_blocks_on_disk(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    layers_path: str | None = None,
) -> nn.Module:
    """A causal LM from a local safetensors checkpoint with everything but the decoder blocks on
    `device` and the blocks left on disk: `analyze` with `SGLPConfig(offload="sequential")`
    reads one block at a time in the statistics pass, the loss check and SLEB (not in the subset
    search, which needs every block at once).

    `dtype` defaults to the checkpoint's. Tensors that transformers renames on load are read under
    the model's names (`model_names`); families whose weights it converts on load (e.g. fused MoE
    experts) are refused.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .auto_class import auto_model_class

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        model = auto_model_class(config).from_config(config, **({} if dtype is None else {"dtype": dtype}))
    blocks = find_decoder_blocks(model, layers_path)
    files = weight_files(directory)  # read once: the renames and the loader both need its names
    loader = SafetensorsBlocks(files, blocks.path, model_names(model, list(files)))
    unexpected = sorted(set(loader.files) - set(model.state_dict()))
    if unexpected:
        raise ValueError(
            f"The checkpoint in {str(directory)!r} has tensors this {type(model).__name__} does not "
            f"name, e.g. {unexpected[:3]}: transformers converts them on load (e.g. fused MoE "
            "experts), which reading blocks from disk does not do. Load the model whole and use "
            "offload=\"sequential\" with blocks moved from CPU memory instead."
        )
    rest = [name for name in loader.files if not name.startswith(blocks.path + ".")]
    for name in rest:  # one at a time: a tensor cast to `dtype` never waits beside all the others as read
        _swap_tensor(model, name, read_tensors(loader.files, [name], torch.device(device), loader.stored)[name])
    model.tie_weights()
    blocks_prefix = blocks.path + "."
    missing = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_meta and not name.startswith(blocks_prefix)
    ]
    if missing:
        raise ValueError(f"The checkpoint in {str(directory)!r} has no weights for {missing}.")
    for block in blocks.layers:
        block.register_forward_pre_hook(_refuse_unloaded)
    setattr(model, BLOCK_LOADER_ATTRIBUTE, loader)
    return model.eval()


@contextmanager
def onloaded(loader: BlockLoader, index: int, block: nn.Module, device: torch.device) -> Iterator[None]:
    loader.onload(index, block, device)
    try:
        yield
    finally:
        loader.offload(index, block)
