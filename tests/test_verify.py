"""Verification of every rewrite, and the rewrite rules it found necessary: a pruned model that
does not compute what the original computes with the dropped blocks skipped is never written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import sglp_llm.model.rewrite as rewrite
from sglp_llm import SGLPConfig
from sglp_llm.api import prune
from sglp_llm.model.blocks import find_decoder_blocks, text_config
from sglp_llm.plan import PruningPlan
from sglp_llm.model.rewrite import RewriteError, is_index_list, is_per_block, remap_index_list, remove_blocks
from sglp_llm.model.offload import load_with_blocks_on_disk
from sglp_llm.output.verify import VerificationError, make_probe, skipped

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tiny_architectures import tiny_causal_lm  # noqa: E402

BATCHES = [tiny_batch(2, 16, seed=i) for i in range(4)]


def settings(**overrides) -> SGLPConfig:
    return SGLPConfig(**{"drop": 3, "seq_len": 16, "n_samples": 8, "batch_size": 2, **overrides})


def plan_for(model, dropped: list[int], **config) -> PruningPlan:
    """A plan that drops `dropped`, as if an analysis had chosen them (no analysis runs)."""
    blocks = find_decoder_blocks(model)
    n = len(blocks.layers)
    return PruningPlan(
        num_blocks=n, layers_path=blocks.path, cka=[[1.0] * n] * n, segments=[list(range(n))],
        scores=[None] * n, keep_per_segment=[n - len(dropped)], dropped=dropped,
        kept=[i for i in range(n) if i not in dropped], n_tokens=0, n_batches=0,
        config=settings(drop=len(dropped), **config).to_dict(),
    )


def logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def tiny(model_type: str, seed: int = 0, **fields):
    """A tiny model of a family outside tests.tiny_models, weights perturbed like theirs."""
    torch.manual_seed(seed)
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=6,
                max_position_embeddings=128)
    config = AutoConfig.for_model(model_type, **{**base, **fields})
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_verifies_exactly_in_memory_and_after_reloading(family, tmp_path):
    model = tiny_model(family, num_layers=8)
    result = prune(model, BATCHES, settings(), progress=False)
    result.save_pretrained(tmp_path / "out")
    record = result.plan.extra["verification"]
    assert set(record["checks"]) == {"The pruned model", "The saved model, reloaded"}
    assert all(c["max_relative_difference"] == 0.0 and c["greedy_equal"] for c in record["checks"].values())
    assert "verify_s" in result.plan.timings
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Verified: the pruned model in memory and the saved folder reloaded with from_pretrained reproduce the original model" in card


def test_the_reference_is_the_original_with_blocks_skipped():
    """The hooks hand each dropped block's input on: equal to running only the kept blocks."""
    model = tiny_model("llama", num_layers=6)
    batch = tiny_batch(2, 10)
    with skipped(find_decoder_blocks(model).layers, [1, 4]):
        hooked = logits(model, batch)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in (0, 2, 3, 5))
    model.config.num_hidden_layers = 4
    assert torch.equal(hooked, logits(model, batch))


def test_a_skipped_renumbering_is_caught_and_the_model_is_put_back(monkeypatch, tmp_path):
    """Without renumbering, the kept blocks write the KV cache at their old indices: greedy
    generation with the cache differs. The rewrite is undone and nothing is written."""
    model = tiny_model("llama", num_layers=8)
    before = logits(model, BATCHES[0])
    monkeypatch.setattr(rewrite, "LAYER_INDEX_ATTRIBUTES", ())
    with pytest.raises(VerificationError, match="The pruned model of this LlamaForCausalLM") as error:
        prune(model, BATCHES, plan=plan_for(model, [1, 2, 5]), progress=False)
    assert "does not compute what the original model computes" in str(error.value) or "could not run" in str(error.value)
    assert len(model.model.layers) == 8 and model.config.num_hidden_layers == 8
    assert not hasattr(model.config, "sglp")
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(8))
    assert torch.equal(before, logits(model, BATCHES[0]))


def test_a_wrong_rewrite_is_refused_before_the_analysis(monkeypatch):
    """A broken rule (layer types left unsliced) is refused in seconds, before any statistics: by
    the config's own validation, by the rewrite's check of what each kept block would be rebuilt
    as, and, with both off, by the trial rewrite's run (the kept blocks get another attention
    pattern)."""
    model = tiny_model("gemma3_text", num_layers=8)
    monkeypatch.setattr(rewrite, "is_per_block", lambda *args: False)
    calls = []
    monkeypatch.setattr("sglp_llm.api.collect_block_statistics", lambda *a, **k: calls.append(1))
    with pytest.raises(RewriteError, match=r"fails its own validation \(`num_hidden_layers` \(6\) must be equal"):
        prune(model, BATCHES, settings(), progress=False)
    monkeypatch.setattr(rewrite, "_check_config", lambda config: None)
    with pytest.raises(RewriteError, match="layer_type='sliding_attention'.* rebuild it as 'full_attention'"):
        prune(model, BATCHES, settings(), progress=False)
    monkeypatch.setattr(rewrite, "_keep_block_constants", lambda blocks, kept: {})
    with pytest.raises(VerificationError, match=r"A trial rewrite \(blocks \[2, 5\] removed\)"):
        prune(model, BATCHES, settings(), progress=False)
    assert not calls  # no statistics were collected
    assert len(model.model.layers) == 8


@pytest.mark.parametrize("where", ["sequential", "disk"])
def test_block_by_block_verification_catches_a_wrong_rewrite(where, monkeypatch, tmp_path):
    model = tiny_model("gemma3_text", num_layers=8)
    model.save_pretrained(tmp_path / "src")
    if where == "disk":
        model = load_with_blocks_on_disk(tmp_path / "src")
    plan = plan_for(model, [2, 3, 6], offload="sequential", scoring="block", loss_candidates=2)
    result = prune(model, BATCHES, plan=plan, progress=False)
    assert result.plan.extra["verification"]["compared"] == "logits (block by block)"
    result.save_pretrained(tmp_path / "out")
    assert set(result.plan.extra["verification"]["checks"]) == {"The pruned model", "The saved model, reloaded"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    source = tiny_model("gemma3_text", num_layers=8)
    with skipped(source.model.layers, [2, 3, 6]):
        assert torch.allclose(logits(source, BATCHES[0]), logits(reloaded, BATCHES[0]), atol=1e-5)

    broken = tiny_model("gemma3_text", num_layers=8) if where == "sequential" else load_with_blocks_on_disk(tmp_path / "src")
    monkeypatch.setattr(rewrite, "is_per_block", lambda *args: False)
    monkeypatch.setattr(rewrite, "_check_config", lambda config: None)
    monkeypatch.setattr(rewrite, "_keep_block_constants", lambda blocks, kept: {})
    with pytest.raises(VerificationError, match="logits differ"):
        prune(broken, BATCHES, plan=plan_for(broken, [2, 3, 6], offload="sequential", scoring="block",
                                             loss_candidates=2), progress=False)


def test_a_block_count_scale_is_compensated_exactly(tmp_path):
    """MiniCPM3 scales each residual branch by scale_depth / sqrt(num_hidden_layers), fixed when
    a block is built: the saved config's scale_depth is rescaled so a reload rebuilds it as is."""
    model = tiny("minicpm3", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8)
    result = prune(model, BATCHES, plan=plan_for(model, [1, 4]), progress=False)
    result.save_pretrained(tmp_path / "out")
    old, new = model.config.sglp["compensated_config"]["scale_depth"]
    assert new == pytest.approx(old * (4 / 6) ** 0.5)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.scale_depth == pytest.approx(new)
    assert all(layer.residual_scale == pytest.approx(1.4 / 6**0.5) for layer in reloaded.model.layers)


def test_an_uncompensated_scale_is_caught_on_reload_and_nothing_is_written(monkeypatch, tmp_path):
    model = tiny("minicpm3", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8)
    monkeypatch.setattr(rewrite, "_keep_block_constants", lambda blocks, kept: {})
    result = prune(model, BATCHES, plan=plan_for(model, [1, 4]), progress=False)  # in memory: exact
    with pytest.raises(VerificationError, match="The saved model, reloaded of this MiniCPM3ForCausalLM"):
        result.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(tmp_path.iterdir())  # no temporary folder left either


def test_an_index_dependent_constant_is_refused_with_its_name():
    """DiffLlama sets each attention's lambda_init from its layer index at construction."""
    model = tiny("diffllama", num_key_value_heads=2)
    with pytest.raises(RewriteError, match=r"lambda_init=.*derived from its index or the block count"):
        remove_blocks(model, [1, 3])
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6


def test_a_structure_chosen_by_index_is_refused():
    """Jamba picks attention or Mamba, experts or not, by period over the block index."""
    model = tiny("jamba", num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, attn_layer_period=2,
                 attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4,
                 mamba_expand=1, use_mamba_kernels=False)
    with pytest.raises(RewriteError, match="decides each block's structure from its index"):
        remove_blocks(model, [1])


def test_index_lists_are_remapped_not_sliced():
    assert is_index_list("moe_layers", list(range(8)), 8)
    assert remap_index_list(list(range(8)), [0, 2, 3, 5, 6, 7]) == [0, 1, 2, 3, 4, 5]
    assert remap_index_list([2, 5, 7], [0, 1, 3, 5, 6, 7]) == [3, 5]
    assert is_index_list("hybrid_layer_ids", [1, 4], 6)
    assert not is_index_list("no_rope_layers", [1, 1, 0, 1, 1, 0], 6)  # per-block flags
    assert not is_index_list("moe_layers", [0, 9], 6)  # not valid indices
    assert not is_index_list("hidden_sizes", [0, 1, 2], 3)  # not named as block indices


def test_only_per_block_lists_are_sliced():
    assert is_per_block("layer_types", ["a", "b", "c"], 3)
    assert is_per_block("no_rope_layers", [1, 1, 0], 3)
    assert not is_per_block("eos_token_id", [2, 7, 9], 3)
    assert not is_per_block("bad_words_ids", [2, 7, 9], 3)
    assert not is_per_block("layer_types", ["a", "b"], 3)


def test_config_lists_after_removal():
    """Llama-4: moe_layers [0..7] without blocks 1 and 4 becomes [0..5]; a 3-token eos stays."""
    config = LlamaConfig(num_hidden_layers=8, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         vocab_size=96, eos_token_id=[2, 5, 7])
    config.moe_layers = list(range(8))
    config.no_rope_layers = [1, 1, 1, 0, 1, 1, 1, 0]
    changes = rewrite._config_changes(config, [0, 2, 3, 5, 6, 7], 8, "num_hidden_layers")
    assert changes["moe_layers"] == [0, 1, 2, 3, 4, 5]
    assert changes["no_rope_layers"] == [1, 1, 0, 1, 1, 0]
    assert changes["num_hidden_layers"] == 6
    assert "eos_token_id" not in changes
    small = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        vocab_size=96, eos_token_id=[2, 5, 7])
    assert "eos_token_id" not in rewrite._config_changes(small, [0, 2], 3, "num_hidden_layers")


def test_decoder_of_an_encoder_decoder_family_counts_decoder_layers(tmp_path):
    """BART's causal LM runs its decoder: the count is decoder_layers (num_hidden_layers is an
    alias of encoder_layers), which is what the rewrite must lower; the encoder's stays."""
    model = tiny("bart", num_hidden_layers=6, decoder_layers=6, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=128)
    blocks = find_decoder_blocks(model)
    assert (blocks.path, blocks.count_field, len(blocks.layers)) == ("model.decoder.layers", "decoder_layers", 6)
    result = prune(model, BATCHES, plan=plan_for(model, [2, 3]), progress=False)
    result.save_pretrained(tmp_path / "out")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert (config.decoder_layers, config.encoder_layers) == (4, 6)


def test_no_verify_skips_every_check(monkeypatch):
    model = tiny_model("llama", num_layers=8)
    monkeypatch.setattr(rewrite, "LAYER_INDEX_ATTRIBUTES", ())  # broken, but not checked
    result = prune(model, BATCHES, settings(verify=False), progress=False)
    assert "verification" not in result.plan.extra and result.reference is None


def test_the_probe_crosses_the_sliding_window():
    model = tiny_model("mistral", num_layers=4, sliding_window=40)
    probe = make_probe(model, BATCHES)
    assert probe.input_ids.shape == (2, 48)
    tokens = torch.cat([b["input_ids"].flatten() for b in BATCHES])
    assert torch.equal(probe.input_ids.flatten()[: tokens.numel()], tokens[: probe.input_ids.numel()])


def test_a_model_dispatched_with_weights_on_disk_is_verified_and_reloaded(tmp_path):
    """accelerate's device map with blocks, embeddings and head offloaded to disk: the reference,
    the pruned model and the reloaded folder all run through accelerate's hooks."""
    tiny_model("llama", num_layers=6).save_pretrained(tmp_path / "src")
    device_map = {
        "model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
        "model.layers.3": "disk", "model.layers.4": "disk", "model.layers.5": "cpu", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "disk",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "src", device_map=device_map, offload_folder=tmp_path / "offload", dtype=torch.float32
    ).eval()
    result = prune(model, BATCHES, plan=plan_for(model, [1, 4]), progress=False)
    result.save_pretrained(tmp_path / "out")
    checks = result.plan.extra["verification"]["checks"]
    assert set(checks) == {"The pruned model", "The saved model, reloaded"}
    assert all(c["max_relative_difference"] == 0.0 and c["greedy_equal"] for c in checks.values())
    source = tiny_model("llama", num_layers=6)
    with skipped(source.model.layers, [1, 4]):
        expected = logits(source, BATCHES[0])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, BATCHES[0]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload", ["none", "sequential"])
def test_a_family_whose_blocks_pass_on_a_state_is_refused_in_words(offload):
    """HY-V4's blocks return (hidden states, top-k indices) and the model hands the indices to
    the next block: a pass-through cannot stand in for one, so the family is refused by name with
    the reason (shown by the loss changing without them, or block by block by the next call
    holding them), not with a Python error, and the model is left as it was."""
    from sglp_llm.model.blocks import UnsupportedModelError

    model = tiny_causal_lm("hy_v4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_batch(batch_size=2, seq_len=12)
    with pytest.raises(UnsupportedModelError) as refused:
        prune(model, [batch], SGLPConfig(drop=1, offload=offload, cka_minibatch_tokens=16), progress=False)
    message = str(refused.value)
    assert "HYV4ForCausalLM (model_type 'hy_v4')" in message and "hands to the next block" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_blocks_returning_attention_weights_unasked_are_not_refused():
    """BLOOM's blocks return their attention weights whether asked or not; the model keeps them
    only when asked, so its loss is the same without them and the family is pruned."""
    model = tiny_causal_lm("bloom")
    result = prune(model, [tiny_batch(batch_size=2, seq_len=12)], SGLPConfig(drop=1, cka_minibatch_tokens=16),
                   progress=False)
    assert len(result.plan.dropped) == 1


def test_a_hybrid_keeps_a_full_attention_block():
    """A Qwen3.5 stack left without its one full-attention block cannot build its masks: the
    "last" baseline, which would drop blocks 3 and 4 here, drops 2 and 4, the rewrite runs and is
    verified, and the plan says why block 3 stayed."""
    model = tiny_causal_lm("qwen3_5_text")
    assert text_config(model).layer_types.count("full_attention") == 1 and text_config(model).layer_types[3] == "full_attention"
    result = prune(model, [tiny_batch(batch_size=2, seq_len=16)], SGLPConfig(drop=2, method="last", seq_len=16,
                                                                            cka_minibatch_tokens=16), progress=False)
    assert result.plan.dropped == [2, 4]
    assert result.plan.extra["kept_as_last_full_attention"] == 3
    assert "block 3 kept" in result.plan.summary()
