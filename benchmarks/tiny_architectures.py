"""Tiny randomly initialised causal LMs of every model type that `AutoModelForCausalLM` knows (and
of the models that also read images, `AutoModelForImageTextToText`'s),
built from configs alone (no Hub access), so that block-level tools can be tried on every
architecture in seconds.

One generic rule sizes every config: each size field, under any of the names families use for it
(`attribute_map` aliases included), gets a tiny value, on the config and on each of its
sub-configs. `OVERRIDES` holds the few per-type corrections where that rule alone fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

VOCAB = 128
MAX_POSITIONS = 256
HEADS, KV_HEADS = 4, 2
WINDOW = 8  # sliding windows, attention chunks, sparse top-k: a 40-token input crosses them
EXPERTS, TOP_K = 4, 2
SSM_STATE = 16


class CannotBuild(Exception):
    """Why no tiny model of this type can be built here (one line)."""


def causal_lm_types() -> list[str]:
    """The model types `AutoModelForCausalLM` maps, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def image_text_types() -> list[str]:
    """The model types only `AutoModelForImageTextToText` maps (models that also read images and
    that `AutoModelForCausalLM` does not build), sorted."""
    return sorted(set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def _generic_sizes(num_blocks: int, hidden: int) -> tuple[dict[str, object], dict[str, object]]:
    """The generic rule, as two maps of config field name -> tiny value: the first is set wherever
    a config has the field, the second only where the family's default is not None (there None
    means "off" or "derive it from the other sizes", which is what a tiny model wants too)."""
    head_dim = hidden // HEADS

    def table(*rules: tuple[object, Sequence[str]]) -> dict[str, object]:
        return {name: value for value, names in rules for name in names}

    always = table(
        (num_blocks, ("num_hidden_layers", "num_layers", "num_blocks", "decoder_layers", "encoder_layers",
                      "num_decoder_layers", "num_encoder_layers")),
        (hidden, ("hidden_size", "hidden_size_global", "out_hidden_size")),  # a vision tower's output: the text's width
        (2 * hidden, ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff",
                      "dff", "dim_ff", "ffn_hidden_size", "d_inner", "feed_forward_size", "intermediate_size_mlp",
                      "dense_intermediate_size", "mamba_d_ssm")),
        (HEADS, ("num_attention_heads", "num_heads", "decoder_attention_heads", "num_decoder_attention_heads",
                 "encoder_attention_heads", "num_encoder_attention_heads", "swa_num_attention_heads",
                 "linear_num_value_heads", "linear_num_heads", "index_n_heads")),
        (KV_HEADS, ("num_key_value_heads", "num_kv_heads", "kv_n_heads", "swa_num_key_value_heads",
                    "linear_num_key_heads")),
        (head_dim, ("head_dim",)),
        (VOCAB, ("vocab_size",)),
        (MAX_POSITIONS, ("max_position_embeddings",)),
        (EXPERTS, ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")),
        (TOP_K, ("num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "top_k_experts")),
        (hidden // 2, ("moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
                       "shared_experts_intermediate_size", "shared_intermediate_size",
                       "moe_shared_expert_intermediate_size")),
        (1, ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "topk_group",
             "first_k_dense_replace", "num_dense_layers")),
        # state-space mixers: expand 2 over heads of head_dim channels
        (2 * HEADS, ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads")),
        (SSM_STATE, ("state_size", "mamba_d_state", "ssm_state_size", "chunk_size", "mamba_chunk_size")),
        # hybrids placing one attention block per period: an attention block among the first three
        (3, ("attn_layer_period", "layer_group_size")),
        (2, ("attn_layer_offset",)),
        # families whose sliding window is optional: on, in half of the blocks
        (True, ("use_sliding_window",)),
        (num_blocks // 2, ("max_window_layers",)),
        (0, ("pad_token_id",)),
        (1, ("bos_token_id",)),
        (2, ("eos_token_id",)),
    )
    if_set = table(
        (head_dim, ("attention_head_size", "swa_head_dim", "linear_key_head_dim",
                    "linear_value_head_dim", "linear_head_dim", "index_head_dim", "mamba_head_dim",
                    # multi-head latent attention
                    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")),
        (2 * head_dim, ("q_lora_rank", "kv_lora_rank", "o_lora_rank")),
        (head_dim // 2, ("rotary_dim",)),
        (2, ("decoder_start_token_id",)),
        (hidden // 4, ("hidden_size_per_layer_input",)),
        (VOCAB, ("unpadded_vocab_size", "vocab_size_per_layer_input", "decoder_vocab_size",
                 "pronunciation_vocab_size", "shape_vocab_size", "output_vocab_size")),
        (WINDOW, ("sliding_window", "window_size", "local_attention", "attention_chunk_size", "keep_window_size",
                  "local_attention_window_len", "index_topk")),
    )
    return always, if_set


def _mrope(rotary_fraction: float = 1.0) -> Callable[[int, int], dict]:
    """Rotary parameters whose multimodal sections (temporal, height, width) cover half of the
    rotated part of a tiny head, in Qwen2-VL's proportions 16 : 24 : 24."""

    def override(n: int, h: int) -> dict:
        half = int(h // HEADS * rotary_fraction) // 2
        spatial = half * 3 // 8
        return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_fraction,
                                    "mrope_section": [half - 2 * spatial, spatial, spatial]}}

    return override


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _cycle(kinds: Sequence[str], n: int) -> list[str]:
    """A per-layer pattern of length n that repeats `kinds`."""
    return [kinds[i % len(kinds)] for i in range(n)]


# model type (of a config or sub-config) -> (num_blocks, hidden) -> fields where the generic rule
# alone fails, merged over it
OVERRIDES: dict[str, Callable[[int, int], dict]] = {
    # hybrids: every block kind, attention among the first three blocks (generate reads the length
    # from an attention cache), where the default pattern is fixed-length, puts attention late or
    # has one kind only
    "bamba": lambda n, h: {"attn_layer_indices": [i for i in range(n) if i % 3 == 2]},
    **{family: lambda n, h: {"layer_types": _cycle(("linear_attention", "linear_attention", "full_attention"), n)}
       for family in ("granitemoehybrid", "kimi_linear")},
    **{family: lambda n, h: {"layer_types": _cycle(("conv", "conv", "full_attention"), n)}
       for family in ("lfm2", "lfm2_moe")},
    "nemotron_h": lambda n, h: {"layers_block_type": _cycle(("linear_attention", "moe", "full_attention", "mlp"),
                                                            n)},
    **{family: lambda n, h: {"layers_block_type": _cycle(("linear_attention", "hybrid"), n)}
       for family in ("zamba", "zamba2")},  # zamba ties its shared block across hybrids: needs two
    # other per-layer patterns that do not shrink with the layer count
    "gpt_neo": lambda n, h: {"attention_types": [[["global", "local"], n // 2]] + [[["global"], 1]] * (n % 2)},
    "gemma3n_text": lambda n, h: {"layer_types": _cycle(("sliding_attention", "full_attention"), n),
                                  "num_kv_shared_layers": n // 3},  # default 15 shared layers
    "dory": lambda n, h: {"n_input_layers": n // 3, "n_output_layers": n // 3},  # default 8 + 8
    # loops blocks 2-3 (by default 6-17, past a tiny stack); loop ends are multiples of the block size
    "inkling2_loop_text": lambda n, h: {"n_layers_per_attn_res_block": 2, "loop_layer_index_start": 2,
                                        "loop_layer_index_end": 4},
    # per-layer expert counts (default 42 layers); the towers' adapters map their width to the text's
    "dots3_note_vision_encoder": lambda n, h: {"pyramid_num_routed": [-1] * (n // 2) + [EXPERTS] * (n - n // 2),
                                               "adapter_in_dim": h, "adapter_out_dim": h},
    "dots3_note_audio_encoder": lambda n, h: {"adapter_input_size": h, "adapter_out_dim": h},
    # its layer count is len(attn_layers); the axial position shape multiplies to max positions,
    # its dims sum to hidden; the LM head needs a decoder
    "reformer": lambda n, h: {"attn_layers": _cycle(("local", "lsh"), n), "is_decoder": True,
                              "axial_pos_shape": (16, MAX_POSITIONS // 16), "axial_pos_embds_dim": (h // 2, h // 2)},
    # defaults under which the model does not build or run at all
    "cohere_compass_text": lambda n, h: {"rope_parameters": {"full_attention": {"rope_type": "default",
                                                                                "rope_theta": 10000.0}}},
    "dbrx": lambda n, h: {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # an indexer scores keys with the query heads of key head 0 (default 12 of 48); its pool and
    # windows sized to the tiny input
    "kolibri1_1": lambda n, h: {"index_num_heads": HEADS // KV_HEADS, "index_topk": WINDOW, "index_pool_size": 2 * WINDOW,
                                "index_compression": 2, "index_num_local_tokens": 4, "index_num_sink_tokens": 1},
    "qwen4_exp_text": lambda n, h: {"indexer_n_heads": HEADS, "indexer_kv_heads": 1, "indexer_head_dim": h // HEADS,
                                    "indexer_budget": WINDOW, "indexer_compress_ratio": 4},
    # multimodal rotary sections (temporal, height, width) sum to half a head (default 16 + 24 + 24)
    **{text: _mrope() for text in ("qwen2_vl_text", "qwen2_5_vl_text", "glm4v_text", "glm_ocr_text",
                                   "paddleocr_vl_text", "hunyuan_vl_text", "qwen2_5_omni_text", "qwen3_omni_moe_text")},
    "glm4v_moe_text": _mrope(rotary_fraction=0.5),
    "step3p5": lambda n, h: {"sliding_window": WINDOW},  # its mask always has a window; checkpoints set one
    "molmo2": lambda n, h: {"adapter_config": {"vision_feature_layer": [-1, -2]}},  # default: layers 24 and 18
    # checkpoints ship the map of image tokens into the text vocabulary, tokens it never predicts:
    # the special ids here, which no text probe holds
    "chameleon": lambda n, h: {"vocabulary_map": {"<image>": 0, "IMGIMGBZ": 1, "IMGIMGCZ": 2}},
    "ernie4_5_vl_moe_text": lambda n, h: {"moe_intermediate_size": [2 * h, 2 * h]},  # one per modality
    "xmod": lambda n, h: {"default_language": "en_XX"},
    "zaya": lambda n, h: {"num_experts_per_tok": 1},  # the only routing it supports
    # the config rounds the qk and v widths (hidden x factor) up to multiples of 64, the kernels do not
    "xlstm": lambda n, h: {"qk_dim_factor": 64 / math.gcd(h, 64), "v_dim_factor": 64 / math.gcd(h, 64)},
    # sizes under names of its own: the sliding-window layers' latent attention
    "dots3_note_text": lambda n, h: {"sliding_window": WINDOW, "swa_num_attention_heads": HEADS,
                                     "swa_num_key_value_heads": HEADS, "swa_q_lora_rank": h // 2,
                                     "swa_kv_lora_rank": h // 2, "swa_head_dim": 2 * (h // HEADS),
                                     "swa_qk_nope_head_dim": h // HEADS, "swa_v_head_dim": h // HEADS},
    "mamba2": lambda n, h: {"num_heads": 2 * HEADS},  # expand * hidden == num_heads * head_dim
    # text only, its cross-attention blocks are skipped (identities): self-attention blocks only
    "mllama_text_model": lambda n, h: {"cross_attention_layers": []},
    # input rows are batch x codebooks: one codebook keeps a row a sequence; generate starts from
    # the extra embedding row past the codebook (checkpoints set that in generation_config.json)
    **{decoder: lambda n, h: {"num_codebooks": 1, "pad_token_id": VOCAB, "bos_token_id": VOCAB,
                              "decoder_start_token_id": VOCAB}
       for decoder in ("musicgen_decoder", "musicgen_melody_decoder")},
    # byte-level (256 bytes + 4 specials) in every stack; the hash n-gram tables are what is large;
    # its cache is built from the top config, which has no num_hidden_layers of its own
    "blt": lambda n, h: {"vocab_size": 260, "encoder_hash_byte_group_vocab": VOCAB, "num_hidden_layers": n,
                         **{key: {"vocab_size": 260} for key in ("patcher_config", "encoder_config",
                                                                 "decoder_config")}},
}

# model type -> generation settings its checkpoints ship in generation_config.json and generate needs
GENERATION_OVERRIDES = {
    "musicgen": {"num_return_sequences": 1},  # its generate expands the inputs by this, with no default
}

# types whose causal LM only drafts for a larger target model: its forward needs the target's
# shared key/value states and embeddings, so it cannot run on input ids alone
NOT_STANDALONE = {
    t: "assistant (drafter) model: its forward needs the target model's shared_kv_states and inputs_embeds"
    for t in ("gemma4_assistant", "gemma4_unified_assistant")
}


def _merge(kwargs: dict, override: dict) -> None:
    """Apply `override` onto `kwargs`, merging into sub-config dicts rather than replacing them."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            _merge(kwargs[key], value)
        else:
            kwargs[key] = value


def _config_kwargs(config_cls: type[PreTrainedConfig], num_blocks: int, hidden: int) -> dict:
    """Keyword arguments that make `config_cls` tiny, sub-configs (as dicts) included."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    always, if_set = _generic_sizes(num_blocks, hidden)
    kwargs = {}

    def field(name: str) -> str | None:
        """The dataclass field behind a size name: itself, or what `attribute_map` aliases it to."""
        return next((f for f in (config_cls.attribute_map.get(name, name), name) if f in defaults), None)

    for name, value in always.items():
        if real := field(name):
            kwargs[real] = value
    for name, value in if_set.items():
        if (real := field(name)) and defaults[real] is not None:
            kwargs[real] = value
    if "kv_lora_rank" in defaults and (kv_heads := field("num_key_value_heads")):
        kwargs[kv_heads] = HEADS  # latent attention decompresses keys and values for every head
    for key, sub_cls in config_cls.sub_configs.items():
        spec = config_cls.sub_configs_defaults.get(key)
        auto = not issubclass(sub_cls, PreTrainedConfig)  # AutoConfig: the spec names the default type
        if auto:
            sub_cls = CONFIG_MAPPING[spec.model_type]
        kwargs[key] = {**(spec.init_kwargs if spec else {}), **_config_kwargs(sub_cls, num_blocks, hidden)}
        if auto:
            kwargs[key]["model_type"] = spec.model_type
    if config_cls.model_type in OVERRIDES:
        _merge(kwargs, OVERRIDES[config_cls.model_type](num_blocks, hidden))
    return kwargs


def _causal_lm_class_and_config(config: PreTrainedConfig) -> tuple[type[torch.nn.Module], PreTrainedConfig]:
    """The class `AutoModelForCausalLM` (else `AutoModelForImageTextToText`) maps `config` to, and
    the config it is built on: like `AutoModelForCausalLM.from_config`, which passes a class built on `text_config` that sub-config,
    but for a sub-config under any name (musicgen's causal LM is built on its `decoder`)."""
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    model_cls = mapping[type(config)]
    for key, sub_cls in config.sub_configs.items():
        if sub_cls is model_cls.config_class:
            return model_cls, getattr(config, key)
    return model_cls, config


def tiny_causal_lm(model_type: str, num_blocks: int = 6, hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised float32 causal LM of `model_type` in eval mode, with `num_blocks`
    decoder blocks of width `hidden`, every weight perturbed so that no block is an identity."""
    if model_type in NOT_STANDALONE:
        raise CannotBuild(NOT_STANDALONE[model_type])
    config_cls = CONFIG_MAPPING[model_type]
    try:  # the generic sizes break some configs' own checks; an override would size them
        model_cls, config = _causal_lm_class_and_config(config_cls(**_config_kwargs(config_cls, num_blocks, hidden)))
    except Exception as err:  # noqa: BLE001 - whatever the config raises, the type is not built
        raise CannotBuild(f"no tiny config (no override yet): {type(err).__name__}: {_first_line(err)}") from err
    torch.manual_seed(seed)
    try:  # eager is the reference attention every model implements
        model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    except ImportError as err:  # a backend this type needs is not installed
        raise CannotBuild(str(err).strip().split(". ")[0]) from err
    except Exception as err:  # noqa: BLE001 - a tiny config the model cannot be built on
        raise CannotBuild(f"no tiny model (no override yet): {type(err).__name__}: {_first_line(err)}") from err
    for key, value in GENERATION_OVERRIDES.get(model_type, {}).items():
        setattr(model.generation_config, key, value)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()
