"""Which transformers Auto class builds a checkpoint's model with its language-model head: the
one class every loader here (whole, blocks on disk, on the meta device for the plans) and every
output (the card's loading code, the CLI's last line) names."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

# the report's key for the Auto class of a saved model that reads images too (absent: a causal LM's)
LOADS_WITH = "loads_with"
CAUSAL_LM = AutoModelForCausalLM.__name__


def auto_model_class(config: Any) -> type:
    """The transformers Auto class that builds `config`'s model with its language-model head:
    AutoModelForCausalLM, or AutoModelForImageTextToText for a checkpoint that also reads images
    (Mistral 3, Qwen2.5-VL, LLaVA, ...), whose text stack is what is pruned and whose vision tower
    stays whole. Neither: AutoModelForCausalLM, whose error names the families it builds."""
    remote = getattr(config, "auto_map", None) or {}
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping or auto.__name__ in remote:
            return auto
    return AutoModelForCausalLM


def reads_images(config: Any) -> bool:
    """Whether the checkpoint also reads images (its Auto class is not the causal LM's)."""
    return auto_model_class(config) is not AutoModelForCausalLM
