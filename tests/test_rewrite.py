"""The rewritten model must be the original model with the dropped blocks skipped, everywhere."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.model.rewrite import RewriteError, remove_blocks, skip_blocks
from tiny_models import FAMILIES, tiny_batch, tiny_model

DROPPED = [1, 4, 5]


def _identity_hooks(model, dropped):
    """Independent reference: the untouched model with dropped blocks turned into identities."""
    layers = find_decoder_blocks(model).layers

    def identity(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    return [layers[i].register_forward_hook(identity, with_kwargs=True) for i in dropped]


def _block_signature(block):
    """What makes a block sliding/full and dense/sparse, as seen by its modules."""
    attn = getattr(block, "self_attn", None)
    return (
        getattr(block, "attention_type", None),
        getattr(attn, "layer_type", None),
        getattr(attn, "is_sliding", None),
        getattr(attn, "sliding_window", None),
        type(getattr(block, "mlp", None)).__name__,
        type(getattr(block, "block_sparse_moe", None)).__name__,
    )


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_pruned_logits_equal_original_with_blocks_skipped(family):
    model = tiny_model(family)
    batch = tiny_batch(pad_last=3)
    handles = _identity_hooks(model, DROPPED)
    with torch.no_grad():
        expected = model(**batch).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        with skip_blocks(model, DROPPED):
            skipped = model(**batch).logits
        full_after = model(**batch).logits
    remove_blocks(model, DROPPED)
    with torch.no_grad():
        pruned = model(**batch).logits
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipped, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full_after, expected, atol=1e-3), "dropping blocks changed nothing"
    assert model.config.num_hidden_layers == 5
    assert model.config.sglp["kept_layers"] == [0, 2, 3, 6, 7]


def test_skip_blocks_restores_model(family):
    model = tiny_model(family)
    batch = tiny_batch()
    config_before = model.config.to_dict()
    with torch.no_grad():
        before = model(**batch).logits
        with skip_blocks(model, DROPPED):
            assert len(find_decoder_blocks(model).layers) == 5
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert model.config.to_dict() == config_before
    idx = [b.self_attn.layer_idx for b in find_decoder_blocks(model).layers]
    assert idx == list(range(8))


def test_generate_with_cache_equals_without(family):
    model = remove_blocks(tiny_model(family), DROPPED)
    prompt = tiny_batch(batch_size=1, seq_len=6)["input_ids"]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape[1] == 16
    assert torch.equal(with_cache, without_cache)


def test_save_load_round_trip_and_block_types(family, tmp_path):
    original = tiny_model(family)
    original_types = getattr(original.config, "layer_types", None)
    original_sigs = [_block_signature(b) for b in find_decoder_blocks(original).layers]
    model = remove_blocks(tiny_model(family), DROPPED)
    kept = model.config.sglp["kept_layers"]
    batch = tiny_batch(pad_last=2)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert reloaded.config.num_hidden_layers == len(kept)
    assert reloaded.config.sglp["kept_layers"] == kept
    if original_types is not None:
        assert reloaded.config.layer_types == [original_types[i] for i in kept]
    for m in (model, reloaded):
        sigs = [_block_signature(b) for b in find_decoder_blocks(m).layers]
        assert sigs == [original_sigs[i] for i in kept]


def test_block_types_differ_in_fixture():
    """Guards the round-trip test: the fixtures really mix sliding/full and dense/sparse blocks."""
    for family in ("gemma3_text", "qwen2", "qwen2_moe", "qwen3_moe"):
        sigs = {_block_signature(b) for b in find_decoder_blocks(tiny_model(family)).layers}
        assert len(sigs) > 1, family


def test_prune_twice_keeps_original_indices():
    model = remove_blocks(tiny_model("llama"), [1, 4, 5])
    remove_blocks(model, [0])
    assert model.config.sglp["kept_layers"] == [2, 3, 6, 7]
    assert model.config.sglp["dropped_layers"] == [0, 1, 4, 5]
    assert model.config.sglp["original_num_hidden_layers"] == 8


def test_bad_drop_sets_are_refused():
    model = tiny_model("llama")
    with pytest.raises(RewriteError, match="within 0..7"):
        remove_blocks(model, [8])
    with pytest.raises(RewriteError, match="At least one decoder block must be kept"):
        remove_blocks(model, range(8))


def test_periodic_layer_pattern_is_refused():
    model = tiny_model("llama")
    model.config.moe_layer_freq = 2
    with pytest.raises(RewriteError, match="moe_layer_freq=2"):
        remove_blocks(model, [1])
