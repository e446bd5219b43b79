"""Sequential onloading: the plain pass's statistics (CKA, per-block GradNorm, the baselines'
observer scores) with only one decoder block on the execution device at a time, for models larger
than that device's memory, or than RAM when the blocks are read from disk (`load_with_blocks_on_disk`).

A block's call arguments other than its hidden-state input (attention masks, which differ per
block in sliding/full attention models, position embeddings, position ids, ...) do not depend on
the hidden states. So one forward with every block replaced by a stub records them, and the blocks
can then run one at a time: each is onloaded, run on every batch's stored input, and offloaded,
with the hidden states kept in CPU memory between blocks. The observers then see the blocks batch
by batch in the plain pass's order, so even the CKA minibatch draws are the same. For GradNorm the
model's own head (final norm, lm_head, softcapping, loss) runs on the stored final hidden state,
and the gradient goes down block by block, each block's forward recomputed with grad.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .blocks import find_decoder_blocks
from .capture import BlockObserver, StopForward, block_input, block_output
from .head import head_gradient
from .hidden_states import BlockStates, spills
from .score import BlockGradNorms, GateScores, causal_lm_loss, grad_only_for

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
                "be moved to run. Load the model with sglp_llm.sequential.load_with_blocks_on_disk, "
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


def read_tensors(files: dict[str, Path], names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({files[name] for name in names}):
        with safe_open(file, framework="pt", device=str(device)) as f:
            tensors.update({name: f.get_tensor(name) for name in names if files[name] == file})
    return tensors


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

    def __init__(self, directory: str | Path, layers_path: str) -> None:
        self.files = weight_files(Path(directory))
        self.layers_path = layers_path
        self._skeleton: dict[int, dict[str, torch.Tensor]] = {}

    def onload(self, index: int, block: nn.Module, device: torch.device) -> None:
        prefix = f"{self.layers_path}.{index}."
        names = [name for name in self.files if name.startswith(prefix)]
        loaded = read_tensors(self.files, names, device)
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

    `dtype` defaults to the checkpoint's. Tensors are read under their checkpoint names, so
    families whose weights transformers renames or fuses on load (e.g. MoE experts) are refused.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    blocks = find_decoder_blocks(model, layers_path)
    loader = SafetensorsBlocks(directory, blocks.path)
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
        _swap_tensor(model, name, read_tensors(loader.files, [name], torch.device(device))[name])
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
def _onloaded(loader: BlockLoader, index: int, block: nn.Module, device: torch.device) -> Iterator[None]:
    loader.onload(index, block, device)
    try:
        yield
    finally:
        loader.offload(index, block)


class _Stub(nn.Module):
    """Stands in for a decoder block in a recording or loss forward. The block is held outside
    the module tree (its parameters are not the stub's); attributes the model's loop reads from
    its blocks (e.g. `attention_type`) come from it."""

    def __init__(self, block: nn.Module, on_call: Callable[[tuple, dict], Any]) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "on_call", on_call)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.on_call(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)


@contextmanager
def stubbed_blocks(layers: nn.ModuleList, on_call: Callable[[int, nn.Module, tuple, dict], Any]) -> Iterator[None]:
    """Replace every block by a stub calling `on_call(index, block, args, kwargs)` (the block
    may be called from there, or not); always restored."""
    originals = list(layers)
    try:
        for index, block in enumerate(originals):
            layers[index] = _Stub(block, lambda args, kwargs, index=index, block=block: on_call(index, block, args, kwargs))
        yield
    finally:
        for index, block in enumerate(originals):
            layers[index] = block


def _move(value: Any, device: torch.device, moved: dict[int, Any]) -> Any:
    """`value` with its tensors on `device`; a tensor shared by several calls is moved once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = value.to(device)
        return moved[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, moved) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, moved) for k, v in value.items()}
    return value


@dataclass
class _BlockCall:
    """One block's call in the model's forward, less its hidden-state input."""

    args: tuple
    kwargs: dict
    positional: bool  # whether the hidden states came as the first positional argument

    @classmethod
    def record(cls, args: tuple, kwargs: dict) -> "_BlockCall":
        if args:
            return cls(args[1:], kwargs, True)
        return cls((), {k: v for k, v in kwargs.items() if k != "hidden_states"}, False)

    def run(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.positional:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, hidden_states=hidden, **self.kwargs)


def _record_calls(
    model: nn.Module, layers: nn.ModuleList, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, list[_BlockCall]]:
    """The first block's hidden-state input (the embedding output) and every block's call."""
    calls: list[tuple[int, tuple, dict]] = []

    def record(index: int, block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        calls.append((index, args, kwargs))
        if index == len(layers) - 1:
            raise StopForward
        return block_input(args, kwargs)

    with torch.no_grad(), stubbed_blocks(layers, record):
        try:
            causal_lm_loss(model, batch)
        except StopForward:
            pass
    order = [index for index, _, _ in calls]
    if order != list(range(len(layers))):
        raise RuntimeError(
            f"Sequential offloading needs a model that calls each decoder block once, in order; "
            f"this {type(model).__name__} called them in the order {order}."
        )
    moved: dict[int, Any] = {}
    first = block_input(calls[0][1], calls[0][2]).detach().cpu()
    recorded = [_BlockCall.record(args, kwargs) for _, args, kwargs in calls]
    return first, [
        _BlockCall(_move(call.args, device, moved), _move(call.kwargs, device, moved), call.positional)
        for call in recorded
    ]


@torch.no_grad()
def final_hidden_states(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[dict[str, torch.Tensor]], *,
    device: torch.device, loader: BlockLoader, progress: bool = True, desc: str = "Sequential forward",
) -> tuple[list[torch.Tensor], bool]:
    """The last block's output for every batch (on the CPU) with one block on `device` at a
    time, and whether the blocks return tuples (for `head.final_hidden_state`). Memory: one
    hidden state per batch."""
    recorded = [_record_calls(model, layers, batch, device) for batch in batches]
    hidden = [first for first, _ in recorded]
    returns_tuple = False
    for index in tqdm(range(len(layers)), desc=desc, disable=not progress):
        block = layers[index]
        with _onloaded(loader, index, block, device):
            for b, (_, calls) in enumerate(recorded):
                output = calls[index].run(block, hidden[b].to(device))
                returns_tuple = isinstance(output, (tuple, list))
                hidden[b] = block_output(output).cpu()
    return hidden, returns_tuple


def _final_hidden_gradient(
    model: nn.Module, layers: nn.ModuleList, batch: dict[str, torch.Tensor], final: torch.Tensor, returns_tuple: bool
) -> torch.Tensor:
    """d loss / d final hidden state, the loss computed by the model's own code (final norm,
    lm_head, logit softcapping, loss): the last stub returns the stored final hidden state."""
    return head_gradient(model, layers, batch, final, returns_tuple)[1].cpu()


def sequential_pass(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Sequence[dict[str, torch.Tensor]],
    observers: Sequence[BlockObserver],
    grads: BlockGradNorms | None = None,
    gates: GateScores | None = None,
    *,
    device: str | torch.device | None = None,
    loader: BlockLoader | None = None,
    hidden_states: str = "auto",
    hidden_states_dir: str | Path | None = None,
    progress: bool = True,
) -> int:
    """Feed `observers` and, if given, the gate scores `gates` and every block's GradNorm `grads`
    (one group per block) exactly as the plain hooked pass does, holding one block on `device` at
    a time.

    `device` defaults to that of the input embeddings; `loader` to the model's own (see
    `load_with_blocks_on_disk`), else moving blocks there and back. Every block's states are kept
    in memory or on disk under `hidden_states_dir` (sglp_llm.hidden_states: "auto" spills them when
    they would not fit). Run in eval mode (analyze does). Returns the number of batches.
    """
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    loader = loader or getattr(model, BLOCK_LOADER_ATTRIBUTE, None) or MoveBlocks()
    num_blocks = len(layers)
    batches = [{k: v.to(model.get_input_embeddings().weight.device) for k, v in b.items()} for b in batches]
    firsts: list[torch.Tensor] = []
    calls: list[list[_BlockCall]] = []
    for batch in batches:
        first, batch_calls = _record_calls(model, layers, batch, device)
        firsts.append(first)
        calls.append(batch_calls)
    total_bytes = (num_blocks + 1) * sum(first.numel() * first.element_size() for first in firsts)
    with BlockStates(spills(hidden_states, total_bytes), hidden_states_dir) as states:
        states.put(0, firsts)
        current, returns_tuple = firsts, False
        with torch.no_grad():
            for index in tqdm(range(num_blocks), desc="SGLP sequential forward", disable=not progress):
                block = layers[index]
                with _onloaded(loader, index, block, device):
                    outputs = []
                    for b, state in enumerate(current):
                        output = calls[b][index].run(block, state.to(device))
                        returns_tuple = isinstance(output, (tuple, list))
                        outputs.append(block_output(output).cpu())
                states.put(index + 1, outputs)
                current = outputs
        del current, outputs

        for b, batch in enumerate(batches):
            for observer in observers:
                observer.start_batch(batch["attention_mask"].bool())
            block_in = states.get(0, b).to(device)
            for index in range(num_blocks):
                block_out = states.get(index + 1, b).to(device)
                for observer in observers:
                    observer.on_block(index, block_in, block_out)
                block_in = block_out
            for observer in observers:
                observer.finish_batch()

        if gates is not None or grads is not None:
            gates = gates if gates is not None else GateScores(num_blocks)
            with grad_only_for(model, ()):
                _backward(model, layers, batches, states, calls, gates, grads, device, loader, returns_tuple, progress)
    return len(batches)


def _backward(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: list[dict[str, torch.Tensor]],
    states: BlockStates,
    calls: list[list[_BlockCall]],
    gates: GateScores,
    grads: BlockGradNorms | None,
    device: torch.device,
    loader: BlockLoader,
    returns_tuple: bool,
    progress: bool,
) -> None:
    """Backpropagate each batch's loss block by block (last first), pairing the gradient of each
    block's output with the block's Δ for the gate scores and, with `grads`, folding its parameter
    gradients into its GradNorm; only one block's parameters ever get gradients."""
    num_blocks = len(layers)
    upstream = [
        _final_hidden_gradient(model, layers, batch, states.get(num_blocks, b).to(device), returns_tuple)
        for b, batch in enumerate(batches)
    ]
    blocks_down = tqdm(reversed(range(num_blocks)), total=num_blocks, desc="SGLP sequential backward", disable=not progress)
    predicted = [gates.start_batch(batch["attention_mask"].bool()) for batch in batches]
    for index in blocks_down:
        for b in range(len(batches)):
            gates.on_gradient(index, states.get(index + 1, b) - states.get(index, b), upstream[b], predicted[b])
        states.drop(index + 1)  # this block's output is no longer needed
        # the first block runs again only for its weight gradients: its input needs none
        if index > 0 or grads is not None:
            block = layers[index]
            weights = block.parameters() if grads is not None else ()
            with _onloaded(loader, index, block, device), grad_only_for(block, weights):
                scorer = BlockGradNorms([block.parameters()], device=gates.device) if grads is not None else None
                with scorer.hooks() if scorer is not None else nullcontext():
                    for b in range(len(batches)):
                        block_in = states.get(index, b).to(device).detach().requires_grad_(index > 0)
                        output = block_output(calls[b][index].run(block, block_in))
                        output.backward(upstream[b].to(output.device))
                        if index > 0:
                            upstream[b] = block_in.grad.cpu()
                if scorer is not None:
                    grads.squared[index] += scorer.squared[0]
    if grads is not None:
        for _ in batches:
            grads.end_batch()
    gates.check_finite()
