"""Finding decoder blocks by family, by the generic rule, and by override."""

from __future__ import annotations

import pytest
from torch import nn

from sglp_llm.model.blocks import UnsupportedModelError, find_decoder_blocks
from tiny_models import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_known_families(family):
    model = tiny_model(family, num_layers=4)
    blocks = find_decoder_blocks(model)
    assert blocks.path == "model.layers"
    assert blocks.layers is model.model.layers and len(blocks) == 4


class _Config:
    num_hidden_layers = 3
    model_type = "homebrew"


class _Homebrew(nn.Module):
    def __init__(self, n_blocks=3, n_heads=2):
        super().__init__()
        self.config = _Config()
        self.heads = nn.ModuleList(nn.Linear(2, 2) for _ in range(n_heads))
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList(nn.Linear(2, 2) for _ in range(n_blocks))


def test_generic_rule_finds_the_list_with_num_hidden_layers():
    blocks = find_decoder_blocks(_Homebrew())
    assert blocks.path == "trunk.stack" and blocks.attribute == "stack"


def test_ambiguous_or_missing_blocks_name_the_override():
    with pytest.raises(UnsupportedModelError, match="--layers-path"):
        find_decoder_blocks(_Homebrew(n_heads=3))
    assert find_decoder_blocks(_Homebrew(n_heads=3), "trunk.stack").path == "trunk.stack"
    with pytest.raises(UnsupportedModelError, match="does not name an nn.ModuleList"):
        find_decoder_blocks(_Homebrew(), "trunk")
    with pytest.raises(UnsupportedModelError, match="has 2 modules but the config counts"):
        find_decoder_blocks(_Homebrew(), "heads")


def test_a_hybrid_keeps_its_deepest_full_attention_block_only_where_the_drop_could_take_them_all():
    from sglp_llm.model.blocks import last_full_attention, layer_kinds

    linear, full, sliding = "linear_attention", "full_attention", "sliding_attention"
    hybrid = [linear, linear, full, linear, linear, full, linear, linear]
    assert last_full_attention(hybrid, 2, set()) == 5  # two full-attention blocks, drop 2
    assert last_full_attention(hybrid, 1, set()) is None  # one drop cannot remove both
    assert last_full_attention(hybrid, 3, {2}) is None  # one is protected already
    # the other kinds may all go: three sliding blocks and a drop of 3 keep nothing
    assert last_full_attention([full] * 5 + [sliding] * 3, 3, set()) is None
    assert last_full_attention([full] * 8, 7, set()) is None  # no hybrid
    assert last_full_attention(None, 3, set()) is None  # no per-block kinds
    gemma = tiny_model("gemma3_text", num_layers=6)  # sliding, sliding, full, repeated
    assert layer_kinds(gemma, 6) == [sliding, sliding, full] * 2 and layer_kinds(gemma, 5) is None
    assert layer_kinds(tiny_model("llama", num_layers=4), 4) is None
