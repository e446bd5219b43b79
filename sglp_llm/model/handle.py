"""One handle on the model being pruned, built once per run: the model, its decoder blocks, where
its inputs go, and how its blocks run. Every stage reads these from the handle instead of
re-deriving them from loose arguments (a layers path, an onload device, the offload setting).

How blocks run is decided here, once, by the loader: none, the blocks run where they are, inside
the model's own forward (in memory, or where a device map put them); a `BlockLoader`, one block at
a time on `onload_device` (sequential onloading from CPU memory, or blocks read from disk), by the
block-by-block runners of sglp_llm.passes.sequential.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import DecoderBlocks, find_decoder_blocks
from .devices import input_device
from .offload import BLOCK_LOADER_ATTRIBUTE, BlockLoader, InPlace, MoveBlocks


@dataclass(frozen=True)
class ModelHandle:
    model: nn.Module
    blocks: DecoderBlocks
    # None: the blocks run in the model's own forward; else one at a time, onloaded by it
    loader: BlockLoader | None = None
    onload_device: torch.device | None = None  # where a blockwise run puts each block

    @classmethod
    def of(
        cls,
        model: nn.Module | ModelHandle,
        *,
        layers_path: str | None = None,
        offload: str = "none",
        onload_device: str | torch.device | None = None,
    ) -> ModelHandle:
        """The handle of `model` (a handle is returned as it is): its blocks at `layers_path` (or
        found by family), run one at a time when `offload` is "sequential" or the model carries
        its own block loader (blocks on disk), else in the model's own forward."""
        if isinstance(model, ModelHandle):
            return model
        handle = cls(model, find_decoder_blocks(model, layers_path))
        loader = getattr(model, BLOCK_LOADER_ATTRIBUTE, None)
        if loader is not None or offload == "sequential":
            handle = handle.one_block_at_a_time(onload_device, loader)
        return handle

    @classmethod
    def for_config(cls, model: nn.Module | ModelHandle, config: Any) -> ModelHandle:
        """The handle an SGLPConfig describes."""
        return cls.of(model, layers_path=config.layers_path, offload=config.offload, onload_device=config.onload_device)

    @classmethod
    def for_plan(cls, model: nn.Module | ModelHandle, plan: Any) -> ModelHandle:
        """The handle a PruningPlan was made with: its settings, at the blocks it found."""
        return cls.of(model, layers_path=plan.layers_path, offload=plan.config.get("offload", "none"),
                      onload_device=plan.config.get("onload_device"))

    def one_block_at_a_time(self, device: str | torch.device | None = None,
                            loader: BlockLoader | None = None) -> ModelHandle:
        """This handle with its blocks run one at a time (itself when they already are): on
        `device` (default: the input device), brought there by `loader` (default: moved from
        where they are held)."""
        if self.blockwise:
            return self
        device = torch.device(device) if device is not None else self.input_device
        return dataclasses.replace(self, loader=loader or MoveBlocks(), onload_device=device)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks as they are now (a rewrite or a skip replaces the list)."""
        return self.blocks.layers

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model)

    @property
    def blockwise(self) -> bool:
        return self.loader is not None

    @property
    def block_device(self) -> torch.device:
        """Where the blocks run: the onload device when one at a time, else the input device."""
        return self.onload_device if self.blockwise else self.input_device

    def devices_used(self) -> list[str]:
        """The devices the weights sit on (an accelerate map's "disk" included) and, one block at
        a time, the device the blocks run on."""
        model = self.model
        found = {str(p.device) for p in model.parameters() if p.device.type != "meta"}
        found |= {str(d) if not isinstance(d, int) else f"cuda:{d}" for d in (getattr(model, "hf_device_map", None) or {}).values()}
        if self.blockwise:
            found.add(str(self.onload_device))
        return sorted(found)

    @property
    def block_loader(self) -> BlockLoader:
        """The loader a block-by-block pass uses: this handle's, or each block where it is."""
        return self.loader or InPlace()
