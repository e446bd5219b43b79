"""Models larger than one device: accelerate device maps and offloading (through
`from_pretrained`), and activation checkpointing for the statistics backward.

A device map places whole modules; the statistics pass only needs each block's output on the
block's own device (the CKA Gram matrices are formed there and summed on the CPU) and the block's
parameter gradients (see `score.BlockGradNorms`, which also finds offloaded weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .blocks import UnsupportedModelError

# the strategies accelerate computes a map for; anything else is one device or a full map
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _json_mapping(text: str, flag: str, example: str) -> dict | None:
    """A mapping given inline as JSON or as a .json file; None when `text` is neither."""
    if text.lstrip().startswith("{"):
        source = text
    elif text.endswith(".json"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{flag}: no file {text!r}; give an existing .json file, e.g. {flag} {example}")
        source = path.read_text()
    else:
        return None
    try:
        value = json.loads(source)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag}: {text!r} is not valid JSON ({err}); e.g. {flag} {example}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, e.g. {flag} {example}; got {text!r}.")
    return value


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """`--device-map`: a strategy (auto, balanced, balanced_low_0, sequential), one device (cpu,
    cuda:1, ...), or a module-name -> device mapping as JSON or a .json file ("disk" offloads a
    module to `--offload-folder`)."""
    if value is None or isinstance(value, dict):
        return value
    example = "'{\"model.layers.0\": 0, \"model.layers.1\": \"cpu\", ...}'"
    mapping = _json_mapping(value, "--device-map", example)
    if mapping is not None:
        return mapping
    if value in DEVICE_MAP_STRATEGIES:
        return value
    try:
        torch.device(value)
    except RuntimeError:
        raise ConfigError(
            f"--device-map takes {', '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, cuda:0) or a "
            f"JSON mapping of module names to devices (inline or a .json file); got {value!r}."
        ) from None
    return value


def _device_key(key: Any) -> Any:
    """accelerate names GPUs by index: "0" -> 0."""
    return int(key) if isinstance(key, str) and key.isdigit() else key


def parse_max_memory(value: str | dict | None) -> dict | None:
    """`--max-memory`: per-device limits for the `auto`/`balanced` strategies, as
    `0=20GiB,1=20GiB,cpu=60GiB`, JSON, or a .json file."""
    if value is None:
        return None
    example = "0=20GiB,cpu=60GiB"
    mapping = value if isinstance(value, dict) else _json_mapping(value, "--max-memory", example)
    if mapping is None:
        mapping = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            device, sep, limit = item.partition("=")
            if not sep or not device.strip() or not limit.strip():
                raise ConfigError(f"--max-memory takes DEVICE=LIMIT pairs, e.g. --max-memory {example}; got {value!r}.")
            mapping[device.strip()] = limit.strip()
    return {
        _device_key(device): int(limit) if isinstance(limit, str) and limit.isdigit() else limit
        for device, limit in mapping.items()
    }


def choose_devices(run: dict[str, Any], config: Any, n_gpus: int) -> tuple[dict[str, Any], Any, str]:
    """The CLI's placement when the user named none (no `device_map`, no `onload_device` of the
    SGLPConfig `config`, which may be None for commands without one): with a
    GPU, the model goes there (accelerate's "auto" map: GPUs first, then CPU memory), or under
    sequential onloading each block runs on the first GPU; without one, the CPU. Returns the run
    settings, the SGLPConfig and a line saying where the run goes and how to move it."""
    if run.get("device_map") is not None or getattr(config, "onload_device", None) is not None:
        return run, config, ""
    if n_gpus == 0:
        return run, config, "Running on the CPU (no GPU found)."
    if getattr(config, "offload", "none") == "sequential":
        rest = "the embeddings and head on cuda:0 too" if run.get("blocks_on_disk") else "the rest of the model in CPU memory"
        return run, config.replace(onload_device="cuda:0"), (
            f"A GPU is present: each block runs on cuda:0, {rest}; pass --onload-device cpu to stay on the CPU."
        )
    return {**run, "device_map": "auto"}, config, (
        "A GPU is present: the model is placed with --device-map auto (GPUs first, then CPU memory); "
        "pass --device-map cpu to stay on the CPU."
    )


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the device of the input embeddings (first device of a map), or
    for embeddings that accelerate offloads, the device they run on."""
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError as err:  # e.g. an OCR encoder-decoder that reads only images
        raise UnsupportedModelError(
            f"This {type(model).__name__} (model_type {model.config.model_type!r}) exposes no input embeddings for "
            f"token ids ({err}): sglp-llm calibrates a language model on text, so it cannot depth-prune this one."
        ) from err
    # one table, or several (one per codebook, e.g. MusicGen)
    device = next(embeddings.parameters()).device
    if device.type == "meta":
        device = torch.device(getattr(getattr(embeddings, "_hf_hook", None), "execution_device", "cpu"))
    return device
