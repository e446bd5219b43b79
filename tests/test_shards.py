"""A model whose blocks stay on disk is pruned and saved straight from its source files: the result
loads with plain transformers and computes what the original model computes without the dropped
blocks, sharded or not, in the dtype it was loaded in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sglp_llm import SGLPConfig, prune
from sglp_llm.model.rewrite import skip_blocks
from sglp_llm.model.offload import load_with_blocks_on_disk, weight_files
from sglp_llm.model.shards import INDEX_NAME, WEIGHTS_NAME, renamed_tensors, write_pruned_weights
from tiny_models import tiny_batch, tiny_model

CONFIG = dict(drop=2, scoring="block", offload="sequential", cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4)
BATCHES = [tiny_batch(batch_size=4, seq_len=16, seed=s) for s in (0, 1)]


def test_renamed_tensors_renumbers_kept_blocks_and_leaves_out_dropped_ones():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w",
             "model.layers.10.mlp.w", "model.layers.2.self_attn.q.weight", "lm_head.weight"]
    assert renamed_tensors(names, "model.layers", [0, 2, 10]) == {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.0.mlp.w": "model.layers.0.mlp.w",
        "model.layers.10.mlp.w": "model.layers.2.mlp.w",  # not confused with block 1
        "model.layers.2.self_attn.q.weight": "model.layers.1.self_attn.q.weight",
        "lm_head.weight": "lm_head.weight",
    }


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3_text ties lm_head to the embeddings
def test_pruned_model_from_disk_equals_the_original_without_its_blocks(family, tmp_path):
    model = tiny_model(family, num_layers=6)
    model.save_pretrained(tmp_path / "source", max_shard_size="40KB")
    assert (tmp_path / "source" / INDEX_NAME).is_file()
    sources = {p.name: p.read_bytes() for p in (tmp_path / "source").iterdir()}

    result = prune(load_with_blocks_on_disk(tmp_path / "source"), BATCHES, SGLPConfig(**CONFIG), progress=False)
    saved = result.save_pretrained(tmp_path / "pruned")

    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert reloaded.config.num_hidden_layers == 4
    batch = tiny_batch(batch_size=2, seq_len=12, seed=7)
    with torch.no_grad(), skip_blocks(model, result.plan.dropped):
        expected = model(**batch).logits
    torch.testing.assert_close(reloaded(**batch).logits, expected)
    # bit for bit the weights of the original model pruned in memory by the same plan
    in_memory = prune(model, plan=result.plan, progress=False).model.state_dict()
    assert reloaded.state_dict().keys() == in_memory.keys()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in in_memory.items())
    # the source checkpoint is untouched
    assert {p.name: p.read_bytes() for p in (tmp_path / "source").iterdir()} == sources


def test_weights_are_sharded_with_an_index_and_cast_to_the_loaded_dtype(tmp_path):
    model = tiny_model("llama", num_layers=6)
    model.save_pretrained(tmp_path / "source")
    lazy = load_with_blocks_on_disk(tmp_path / "source", dtype=torch.bfloat16)
    result = prune(lazy, BATCHES, SGLPConfig(**CONFIG), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    files = weight_files(tmp_path / "source")
    block_bytes = sum(
        p.numel() * 2 for p in model.model.layers[0].parameters()
    )  # bf16: one block per shard at most
    written = write_pruned_weights(out, result.model, files, "model.layers", result.plan.kept, max_shard_bytes=block_bytes)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(written) == len(set(index["weight_map"].values())) + 1 > 3
    assert set(index["weight_map"]) == set(result.model.state_dict())
    total = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(out / file, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= block_bytes or len(tensors) == 1
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    result.model.config.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    kept = result.plan.kept
    torch.testing.assert_close(
        reloaded.model.layers[3].mlp.down_proj.weight, model.model.layers[kept[3]].mlp.down_proj.weight.bfloat16()
    )
    assert not (out / WEIGHTS_NAME).exists()


def test_a_checkpoint_lacking_a_weight_is_refused(tmp_path):
    model = tiny_model("llama", num_layers=6)
    model.save_pretrained(tmp_path / "source")
    lazy = load_with_blocks_on_disk(tmp_path / "source")
    result = prune(lazy, BATCHES, SGLPConfig(**CONFIG), progress=False)
    files = {k: v for k, v in weight_files(tmp_path / "source").items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"no tensors for \['model.norm.weight'\]"):
        write_pruned_weights(tmp_path, result.model, files, "model.layers", result.plan.kept)
