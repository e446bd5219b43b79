"""Which transformers Auto class builds a checkpoint's model with its language-model head: the
one class every loader here (whole, blocks on disk, on the meta device for the plans) and every
output (the card's loading code, the CLI's last line) names."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

CAUSAL_LM = AutoModelForCausalLM.__name__
# the report's (and a healing report's) record of how a saved model that also reads images loads:
# {"loads_with": its Auto class, "processor": whether its processor was saved}; absent for a text model
IMAGES = "images"


def auto_model_class(config: Any) -> type:
    """The transformers Auto class that builds `config`'s model with its language-model head:
    AutoModelForCausalLM, or AutoModelForImageTextToText for a checkpoint that also reads images
    (Mistral 3, Qwen2.5-VL, LLaVA, ...), whose text stack is what is pruned and whose vision tower
    stays whole. Neither: AutoModelForCausalLM, whose error names the families it builds."""
    return AutoModelForImageTextToText if _builds(AutoModelForImageTextToText, config) and not _builds(
        AutoModelForCausalLM, config) else AutoModelForCausalLM


def reads_images(config: Any) -> bool:
    """Whether the checkpoint also reads images: `AutoModelForImageTextToText` builds it (Gemma 3
    and Llama 4 load with `AutoModelForCausalLM` too, and read images all the same)."""
    return _builds(AutoModelForImageTextToText, config)


def _builds(auto: type, config: Any) -> bool:
    """Whether the Auto class `auto` builds a model of `config` (remote code's through its auto_map)."""
    return type(config) in auto._model_mapping or auto.__name__ in (getattr(config, "auto_map", None) or {})


def images_record(config: Any, preprocessing: Any) -> dict[str, Any] | None:
    """The `IMAGES` record of a model saved with `preprocessing` (its processor or tokenizer); None
    for a text model."""
    from transformers import ProcessorMixin

    if not reads_images(config):
        return None
    return {"loads_with": auto_model_class(config).__name__, "processor": isinstance(preprocessing, ProcessorMixin)}
