"""A fast subset of the architecture sweep (benchmarks/architectures.py): one type per cause of
a wrong rewrite seen across transformers' causal LMs and the models that also read images, each
either exact or refused with its reason, never written wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from architectures import classify  # noqa: E402

CASES = {
    "llama": ("exact", ""),
    "gpt2": ("exact", ""),  # blocks under transformer.h, n_layer
    "bart": ("exact", ""),  # a decoder counted in decoder_layers
    "llama4_text": ("exact", ""),  # moe_layers: an index list, remapped
    "minicpm3": ("exact", ""),  # scale_depth / sqrt(num_hidden_layers), compensated
    "got_ocr2": ("exact", ""),  # a vision tower as deep as the text stack: get_decoder()
    "diffllama": ("refused", "lambda_init"),  # initialised from the block index
    "jamba": ("refused", "structure from its index"),  # attention/expert periods
    "recurrent_gemma": ("refused", "structure from its index"),  # cyclic block types
    "gemma3n_text": ("refused", "store_full_length_kv"),  # KV sharing between blocks
    "dots3_note_text": ("refused", "fails its own validation"),  # per-layer-type sub-configs
    "musicgen": ("refused", "next-token loss"),  # codebooks, not a text causal LM
    "bloom": ("exact", ""),  # blocks return attention weights unasked: not passed on
    "cpmant": ("exact", ""),  # the loop unpacks (hidden, attention) from every block
    "hy_v4": ("refused", "a state of its own"),  # top-k indices handed to the next block
    # models that also read images (AutoModelForImageTextToText), their text stack pruned
    "mistral3": ("exact", ""),
    "qwen2_5_vl": ("exact", ""),  # multimodal rotary positions
    "pp_formulanet": ("refused", "exposes no input embeddings"),  # reads images only
}


@pytest.fixture
def one_thread():
    """Tiny models run many times faster on one thread when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_each_cause_is_exact_or_refused_with_its_reason(model_type, one_thread):
    status, reason = CASES[model_type]
    outcome = classify(model_type)
    assert outcome.status == status, outcome.detail
    assert reason in outcome.detail
    if status == "exact":
        assert len(outcome.dropped) == 2
