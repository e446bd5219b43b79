"""Tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SLIDING = dict(sliding_window=4)
FAMILY_OVERRIDES = {
    "llama": {},
    "mistral": SLIDING,
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, **SLIDING),
    "qwen2": dict(use_sliding_window=True, max_window_layers=3, **SLIDING),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen3": dict(use_sliding_window=True, max_window_layers=5, **SLIDING),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=2, mlp_only_layers=[1]),
    "gemma": {},
    "gemma2": dict(**SLIDING),
    "gemma3_text": dict(sliding_window_pattern=3, **SLIDING),
    "phi3": dict(**SLIDING),
    "olmo2": {},
    "granite": {},
}
FAMILIES = tuple(FAMILY_OVERRIDES)


def tiny_config(model_type: str = "llama", num_layers: int = 8, **overrides):
    kwargs = {**COMMON, **FAMILY_OVERRIDES[model_type], "num_hidden_layers": num_layers, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", num_layers: int = 8, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_layers, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves some norms at identity and residual paths tiny; perturb every weight so
    # that every block really changes the hidden states
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_tiny_model(folder, model_type: str = "llama", num_layers: int = 8, **overrides):
    """A tiny model and its tokenizer saved in `folder`, as a user's local checkpoint is."""
    tiny_model(model_type, num_layers=num_layers, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_batch(batch_size: int = 2, seq_len: int = 12, seed: int = 0, pad_last: int = 0):
    """Random token ids; the last `pad_last` positions of the last row are right padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_last:
        attention_mask[-1, -pad_last:] = 0
        input_ids[-1, -pad_last:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit VOCAB: the most frequent words of the built-in text."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sglp_llm.data import default_texts

    words = Counter(w for text in default_texts()[0] for w in text.lower().split())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word, _ in words.most_common(VOCAB - len(vocab)):
        vocab[word] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
