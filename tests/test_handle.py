"""The model's handle (sglp_llm.model.handle): built once, it says where the blocks are and how
they run, and every stage reads that from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sglp_llm import SGLPConfig, analyze, prune
from sglp_llm.model.blocks import UnsupportedModelError, find_decoder_blocks
from sglp_llm.model.handle import ModelHandle
from sglp_llm.model.offload import InPlace, MoveBlocks, SafetensorsBlocks, load_with_blocks_on_disk
from sglp_llm.model.rewrite import removing_blocks, skip_blocks
from sglp_llm.selection.removal import calibration_nll
from tiny_models import tiny_batch, tiny_model

CONFIG = dict(n_samples=4, batch_size=2, cka_minibatch_tokens=8, stability_check=False)


def _batches():
    return [tiny_batch(batch_size=2, seq_len=12, seed=s, pad_last=s) for s in range(2)]


def test_a_model_in_memory_runs_its_blocks_in_its_own_forward():
    model = tiny_model("llama", num_layers=4)
    handle = ModelHandle.of(model)
    assert handle.layers is model.model.layers and handle.blocks.path == "model.layers"
    assert not handle.blockwise and handle.onload_device is None
    assert isinstance(handle.block_loader, InPlace) and handle.block_device == torch.device("cpu")
    assert ModelHandle.of(handle) is handle
    assert handle.devices_used() == ["cpu"]


def test_sequential_offload_runs_one_block_at_a_time_on_the_onload_device():
    model = tiny_model("llama", num_layers=4)
    handle = ModelHandle.for_config(model, SGLPConfig(drop=1, offload="sequential", onload_device="cpu"))
    assert handle.blockwise and isinstance(handle.loader, MoveBlocks)
    assert handle.onload_device == torch.device("cpu") == handle.block_device
    assert handle.one_block_at_a_time() is handle
    in_memory = ModelHandle.of(model)
    assert in_memory.one_block_at_a_time().blockwise and not in_memory.blockwise  # a copy, the original unchanged


def test_a_model_with_its_blocks_on_disk_is_run_by_its_own_loader(tmp_path):
    tiny_model("llama", num_layers=4).save_pretrained(tmp_path)
    model = load_with_blocks_on_disk(tmp_path)
    handle = ModelHandle.of(model)  # whatever the settings say: its blocks are not in memory
    assert handle.blockwise and isinstance(handle.loader, SafetensorsBlocks)
    assert handle.onload_device == torch.device("cpu")


def test_the_handle_follows_a_rewrite_and_its_undo():
    model = tiny_model("llama", num_layers=5)
    handle = ModelHandle.of(model)
    original = list(handle.layers)
    with skip_blocks(handle, [1, 3]):
        assert list(handle.layers) == [original[i] for i in (0, 2, 4)]
    assert list(handle.layers) == original
    undo = removing_blocks(handle, [0])
    assert list(handle.layers) == original[1:] and model.config.num_hidden_layers == 4
    undo()
    assert list(handle.layers) == original and model.config.num_hidden_layers == 5


def test_a_plan_handle_finds_the_blocks_where_the_plan_found_them():
    model = tiny_model("llama", num_layers=4)
    plan = analyze(model, _batches(), SGLPConfig(drop=1, **CONFIG), progress=False)
    handle = ModelHandle.for_plan(model, plan)
    assert handle.blocks.path == plan.layers_path and not handle.blockwise


@pytest.mark.parametrize("offload", ["none", "sequential"])
def test_a_named_layers_path_reaches_every_stage(offload):
    """Analysis (statistics pass, loss check), rewrite and verification all run at the one path
    the handle was made with: a stage that looked the blocks up again would fail here."""
    model = tiny_model("llama", num_layers=5)
    # a second list as long as the blocks, in a family the tool does not know: found only by name
    model.model.decoys = nn.ModuleList(nn.Identity() for _ in range(5))
    model.config.model_type = "two-stacks"
    with pytest.raises(UnsupportedModelError, match="layers-path"):
        find_decoder_blocks(model)
    config = SGLPConfig(drop=2, layers_path="model.layers", offload=offload, **CONFIG)
    reference = calibration_nll(ModelHandle.for_config(model, config), _batches(), [])
    result = prune(model, _batches(), config, progress=False)
    assert len(model.model.layers) == 3 and result.plan.layers_path == "model.layers"
    assert result.plan.extra["verification"]["checks"]
    assert reference == pytest.approx(calibration_nll(tiny_model("llama", num_layers=5), _batches(), []), rel=1e-6)
