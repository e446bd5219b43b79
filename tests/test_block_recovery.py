"""Block-local recovery: the kept block before each gap is trained towards the original's state
after the gap; its error is measured against the original's own hidden states, the other blocks
stay bit-identical, the rewrite is verified with the trained weights and survives a round trip
through disk, in memory, one block at a time and with the blocks on disk."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglp_llm import ConfigError, SGLPConfig, prune
from sglp_llm.recovery.block_recovery import recover_blocks, token_relative_error, trained_blocks
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.model.rewrite import skip_blocks
from sglp_llm.model.handle import ModelHandle
from sglp_llm.model.offload import load_with_blocks_on_disk
from tiny_models import tiny_batch, tiny_model


def _batches(n=3):
    return [tiny_batch(batch_size=4, seq_len=16, seed=s, pad_last=3 if s == 0 else 0) for s in range(n)]


def test_the_blocks_trained_and_their_targets():
    assert trained_blocks(8, [3, 4, 6]) == {2: 4, 5: 6}  # the kept block before each run
    assert trained_blocks(8, [0, 1]) == {2: 2}  # no block before: the first kept block
    assert trained_blocks(8, [0, 1, 3]) == {2: 3}  # the first kept block, before a run too
    assert trained_blocks(8, [6, 7]) == {5: 7}  # the final state
    assert trained_blocks(8, []) == {}
    with pytest.raises(ValueError, match="Every block is removed"):
        trained_blocks(2, [0, 1])


def _hidden_states(model, batches, dropped=()):
    with torch.no_grad(), skip_blocks(model, dropped):
        return [model(**b, output_hidden_states=True).hidden_states for b in batches]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3: post-norms, sliding and full attention
def test_training_lowers_the_error_to_the_originals_state_and_touches_nothing_else(family):
    model = tiny_model(family, num_layers=8)
    original = copy.deepcopy(model)
    batches = _batches()
    dropped = [3, 4, 6]
    recovery = recover_blocks(model, batches, dropped, steps=40, learning_rate=1e-3, progress=False)
    assert sorted(recovery.trained) == [2, 5]
    # the reference: the original's own hidden states (hidden_states[i] = the state after block i - 1)
    before = _hidden_states(original, batches)
    plain = _hidden_states(original, batches, dropped)  # the plain drop: blocks 0, 1, 2, 5, 7
    after = _hidden_states(model, batches, dropped)
    masks = [b["attention_mask"].bool() for b in batches]
    for k, target, position in ((2, 5, 3), (5, 7, 4)):
        record = recovery.trained[k]
        assert record["stands_in_for"] == [b for b in dropped if k < b < target]
        expected_before = [token_relative_error(p[position], o[target], m) for p, o, m in zip(plain, before, masks)]
        if k == 2:  # the first gap: block 2 sees the original's input, so before = the plain drop's error
            assert record["relative_error_before"] == pytest.approx(float(sum(expected_before) / 3), rel=1e-5)
        expected_after = [token_relative_error(a[position], o[target], m) for a, o, m in zip(after, before, masks)]
        assert record["relative_error_after"] == pytest.approx(float(sum(expected_after) / 3), rel=1e-4)
        assert record["relative_error_after"] < 0.7 * record["relative_error_before"]
    layers, kept_layers = find_decoder_blocks(original).layers, find_decoder_blocks(model).layers
    for index, (a, b) in enumerate(zip(layers, kept_layers)):
        same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert same == (index not in (2, 5)), index
    assert all(torch.equal(x, y) for (n, x), (_, y) in zip(original.state_dict().items(), model.state_dict().items())
               if ".layers." not in n)
    recovery.restore()
    assert all(torch.equal(x, y) for x, y in zip(original.state_dict().values(), model.state_dict().values()))


def test_one_block_at_a_time_trains_the_same_weights():
    model = tiny_model("llama", num_layers=6)
    sequential = copy.deepcopy(model)
    recover_blocks(model, _batches(2), [0, 3], steps=5, learning_rate=1e-3, progress=False)
    one_at_a_time = ModelHandle.of(sequential, offload="sequential", onload_device="cpu")
    recover_blocks(one_at_a_time, _batches(2), [0, 3], steps=5, learning_rate=1e-3, progress=False)
    for (name, x), (_, y) in zip(model.state_dict().items(), sequential.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7, msg=name)


CONFIG = dict(drop=2, scoring="block", cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4,
              stability_check=False, recover="blocks", recover_steps=30, recover_learning_rate=1e-3)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_prune_recovers_verifies_and_saves_a_plain_checkpoint(tmp_path):
    model = tiny_model("llama", num_layers=6)
    original = copy.deepcopy(model)
    batches = _batches(2)
    result = prune(model, batches, SGLPConfig(**CONFIG), progress=False)
    plan = result.plan
    record = plan.extra["recovery"]
    assert record["method"] == "blocks" and set(map(int, record["trained"])) == set(trained_blocks(6, plan.dropped))
    assert (record["windows"], record["passes"]) == (8, 30 * 4 / 8)  # the given batches, cycled
    assert "The pruned model" in plan.extra["verification"]["checks"]
    probe = tiny_batch(batch_size=2, seq_len=12, seed=7)
    with torch.no_grad(), skip_blocks(original, plan.dropped):  # recovery changed the model
        assert not torch.allclose(original(**probe).logits, _logits(result.model, probe), atol=1e-4)
    folder = result.save_pretrained(tmp_path / "out")
    assert "The saved model, reloaded" in plan.extra["verification"]["checks"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(_logits(reloaded, probe), _logits(result.model, probe), rtol=1e-5, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert "recovery: each kept block that feeds a removed run trained" in card
    assert f"- block {next(iter(record['trained']))} trained to stand in for removed blocks" in card


def test_blocks_on_disk_recover_like_the_model_in_memory(tmp_path):
    model = tiny_model("llama", num_layers=6)
    model.save_pretrained(tmp_path / "source")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "source").iterdir()}
    batches = _batches(2)
    in_memory = prune(model, batches, SGLPConfig(**CONFIG), progress=False)
    lazy = load_with_blocks_on_disk(tmp_path / "source")
    on_disk = prune(lazy, batches, SGLPConfig(**CONFIG, offload="sequential"), progress=False)
    assert on_disk.plan.dropped == in_memory.plan.dropped
    folder = on_disk.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    probe = tiny_batch(batch_size=2, seq_len=12, seed=7)
    torch.testing.assert_close(_logits(reloaded, probe), _logits(in_memory.model, probe), rtol=1e-4, atol=1e-5)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "source").iterdir()} == before  # input untouched


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="`recover` must be one of"):
        SGLPConfig(drop=1, recover="lora")
    with pytest.raises(ConfigError, match="`recover_steps` must be a positive integer"):
        SGLPConfig(drop=1, recover="blocks", recover_steps=0)
    with pytest.raises(ConfigError, match="`recover_learning_rate` must be a positive number"):
        SGLPConfig(drop=1, recover="blocks", recover_learning_rate="1e-4")
    with pytest.raises(ConfigError, match="choose one"):
        SGLPConfig(drop=1, recover="blocks", compensation="rescale")
