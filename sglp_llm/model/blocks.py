"""Finding the decoder blocks of a causal LM.

Every family keeps its blocks in an `nn.ModuleList`, but not always at the same place
(`model.layers`, `model.language_model.layers`, `transformer.h`, ...). Known families are
looked up by `model_type`; anything else falls back to the one `ModuleList` whose length is
the config's block count (`block_counts`). Users can always name the path with `layers_path`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

# model_type -> dotted path from the *ForCausalLM module to the blocks' ModuleList
KNOWN_LAYERS_PATHS = {
    model_type: "model.layers"
    for model_type in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
        "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "granitemoe", "smollm3",
        "cohere", "starcoder2", "stablelm", "deepseek_v3", "glm", "helium", "exaone4",
    )
}
KNOWN_LAYERS_PATHS.update({"gemma3": "model.language_model.layers", "gpt2": "transformer.h"})


class UnsupportedModelError(ValueError):
    """The decoder blocks could not be located; the message names the `layers_path` override."""


@dataclass
class DecoderBlocks:
    """Where the blocks live, so the rewrite can replace the list and fix the right config."""

    path: str
    parent: nn.Module
    attribute: str
    config: object  # the (text) config that owns the block count
    count_field: str = "num_hidden_layers"  # the config field holding the block count

    @property
    def layers(self) -> nn.ModuleList:
        """The list as it is now: a rewrite or a skip puts another in its place."""
        return getattr(self.parent, self.attribute)

    def __len__(self) -> int:
        return len(self.layers)


def text_config(model: nn.Module):
    """The config that describes the decoder stack (multimodal models nest it)."""
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


# config fields that may hold the block count, decoder ones first: the decoder of an
# encoder-decoder family used as a causal LM (BART, Marian, ...) counts its blocks in
# `decoder_layers`, while its `num_hidden_layers` maps to `encoder_layers`
BLOCK_COUNT_FIELDS = (
    "decoder_layers", "num_decoder_layers", "num_hidden_layers", "n_layer", "n_layers", "num_layers",
)


def block_counts(config) -> list[tuple[str, int]]:
    """(real field name, value) of each block-count field the config sets, in preference order;
    aliases (`attribute_map`) are resolved, so the field named is the one saved."""
    aliases = getattr(config, "attribute_map", {}) or {}
    found: dict[str, int] = {}
    for name in BLOCK_COUNT_FIELDS:
        real = aliases.get(name, name)
        value = getattr(config, real, None)
        if isinstance(value, int) and not isinstance(value, bool) and real not in found:
            found[real] = value
    return list(found.items())


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _generic_path(model: nn.Module, num_layers: int | None) -> str | None:
    """The one ModuleList as long as the block count; among several (a vision tower as deep as
    the text stack), the one inside the model's own decoder (`get_decoder()`)."""
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name and len(module) == num_layers
    ]
    if len(matches) > 1 and callable(getattr(model, "get_decoder", None)):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) else set()
        matches = [(name, module) for name, module in matches if id(module) in inside]
    return matches[0][0] if len(matches) == 1 else None


def find_decoder_blocks(model: nn.Module, layers_path: str | None = None) -> DecoderBlocks:
    """Locate the decoder blocks: `layers_path` if given, else by family, else by length."""
    config = text_config(model)
    counts = block_counts(config)
    model_type = getattr(model.config, "model_type", None)
    path = layers_path or KNOWN_LAYERS_PATHS.get(model_type)
    if path is None or (layers_path is None and _resolve(model, path) is None):
        path = next((p for _, n in counts if (p := _generic_path(model, n)) is not None), None)
    if path is None:
        raise UnsupportedModelError(
            f"Could not find the decoder blocks of this {type(model).__name__} "
            f"(model_type={model_type!r}): no single nn.ModuleList as long as the config's block "
            f"count ({', '.join(f'{k}={v}' for k, v in counts) or 'none found'}). Pass layers_path "
            "(CLI: --layers-path), the dotted path to the ModuleList of decoder blocks, e.g. "
            "--layers-path model.layers."
        )
    layers = _resolve(model, path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"layers_path {path!r} does not name an nn.ModuleList in {type(model).__name__} "
            f"(found {type(layers).__name__}). Pass the dotted path to the ModuleList of decoder "
            "blocks with --layers-path, e.g. model.layers."
        )
    count_field = next((k for k, n in counts if n == len(layers)), None)
    if count_field is None:
        raise UnsupportedModelError(
            f"layers_path {path!r} has {len(layers)} modules but the config counts "
            f"{', '.join(f'{k}={v}' for k, v in counts) or 'no blocks'}; pass the path of the "
            "decoder blocks with --layers-path."
        )
    parent_path, _, attribute = path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    return DecoderBlocks(
        path=path, parent=parent, attribute=attribute, config=config, count_field=count_field
    )


# the kinds of block (a config's `layer_types`) that attend over the whole context
FULL_ATTENTION_KINDS = ("full_attention", "attention")


def layer_kinds(model: nn.Module, num_blocks: int) -> list[str] | None:
    """Each block's kind as the config lists it (`layer_types`: "full_attention",
    "linear_attention", "sliding_attention", ...), or None where it lists none for these blocks."""
    kinds = getattr(text_config(model), "layer_types", None)
    return list(kinds) if isinstance(kinds, (list, tuple)) and len(kinds) == num_blocks else None


def last_full_attention(kinds: Sequence[str] | None, n_drop: int, protected: set[int]) -> int | None:
    """The block to keep so that a hybrid stack keeps a full-attention block: where its `kinds`
    (`layer_kinds`) mix full attention with others (linear attention, a sliding window, ...) and
    the drop could remove every full-attention block, the deepest of them (None where not).
    A Qwen3.5 or Qwen3-Next stack without one cannot build its masks, so its rewrite would be
    refused after the analysis; a sliding-window stack without one would see no further than its
    window, which calibration windows shorter than it cannot show. Other kinds may all go."""
    if kinds is None:
        return None
    full = [i for i, kind in enumerate(kinds) if kind in FULL_ATTENTION_KINDS]
    if not full or len(full) == len(kinds) or len(full) > n_drop or not protected.isdisjoint(full):
        return None
    return full[-1]
