"""The memory plan: its parts are the sizes they claim (parameters by dtype, hidden states as
tokens × hidden size), it reads no weight, and `analyze --plan-memory` prints it."""

from __future__ import annotations

import json

import pytest
import torch

from sglp_llm import SGLPConfig
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.cli import main
from sglp_llm.passes.memory_plan import GIB, RUNTIME_BYTES, plan_memory
from tiny_models import tiny_config, tiny_model

SETTINGS = dict(drop=2, seq_len=16, n_samples=8, batch_size=4, cka_minibatch_tokens=16, loss_tokens=64)


def _sizes(model_type="llama", layers=6):
    model = tiny_model(model_type, num_layers=layers)
    blocks = find_decoder_blocks(model).layers
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    total = sum(p.numel() for p in model.parameters())
    return model.config, block, total - sum(sum(p.numel() for p in b.parameters()) for b in blocks), total


def test_blocks_on_disk_plan_counts_one_block_the_rest_and_the_states():
    config, block, rest, _ = _sizes()
    settings = SGLPConfig(offload="sequential", hidden_states="memory", **SETTINGS)
    plan = plan_memory(config, settings, dtype=torch.float32, source_dtype=torch.bfloat16, blocks_on_disk=True, write=True)
    forward = plan.phases["statistics forward"]["cpu"]
    assert forward["one decoder block"] == block * 4
    assert forward["one block as read, before the cast"] == block * 2
    assert forward["embeddings, final norm, head"] == rest * 4
    assert forward["interpreter, torch, transformers"] == RUNTIME_BYTES
    assert forward["hidden states of every block"] == 7 * 8 * 16 * 32 * 4  # 6 blocks + input, 128 tokens, width 32
    check = plan.phases["loss check"]["cpu"]
    assert check["kept block outputs of the pruned network so far"] == 6 * 64 * 32 * 4  # 64 loss tokens
    assert "writing the pruned model" in plan.phases and "one decoder block" not in plan.phases["writing the pruned model"]["cpu"]
    peak = plan.peak()["cpu"]
    assert peak == max(sum(parts["cpu"].values()) for parts in plan.phases.values())
    assert f"cpu: peak {peak / GIB:.2f} GiB" in plan.text()
    # spilled to disk, only two positions' states stay in memory
    spilled = plan_memory(config, settings.replace(hidden_states="disk"), dtype=torch.float32, blocks_on_disk=True)
    assert spilled.phases["statistics forward"]["cpu"]["hidden states of two block positions (the rest on disk)"] == 2 * 8 * 16 * 32 * 4


def test_plain_and_onloaded_plans_place_the_weights_where_they_are():
    config, block, _, total = _sizes("gemma3_text")
    plain = plan_memory(config, SGLPConfig(**SETTINGS), dtype=torch.float32)
    assert plain.mode == "whole model in memory"
    assert plain.phases["statistics forward"]["cpu"]["whole model"] == total * 4
    onloaded = plan_memory(config, SGLPConfig(offload="sequential", onload_device="cuda:0", **SETTINGS),
                           dtype=torch.bfloat16, execution_device="cuda:0")
    assert onloaded.phases["statistics forward"]["cpu"]["whole model (CPU memory)"] == total * 2
    assert onloaded.phases["statistics forward"]["cuda:0"]["one decoder block"] == block * 2
    assert set(onloaded.peak()) == {"cpu", "cuda:0"}


def test_plan_memory_reads_no_weights_and_prints_the_plan(tmp_path, monkeypatch, capsys):
    tiny_model("llama", num_layers=6).save_pretrained(tmp_path / "model")
    import sglp_llm.model.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("--plan-memory loaded the model"))
    monkeypatch.setattr(loading, "load_blocks_on_disk", lambda *a, **k: pytest.fail("--plan-memory loaded the model"))
    report = tmp_path / "plan.json"
    assert main(["analyze", "--model", str(tmp_path / "model"), "--drop", "2", "--offload", "sequential",
                 "--blocks-on-disk", "--plan-memory", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "Memory plan (blocks on disk)" in out and "one decoder block" in out
    saved = json.loads(report.read_text())
    assert saved["mode"] == "blocks on disk" and saved["peak_bytes"]["cpu"] > RUNTIME_BYTES
    assert tiny_config("llama", 6).num_hidden_layers == 6


@pytest.mark.parametrize("method, fit_on", [("rescale", "original"), ("cosine", "pruned")])
def test_compensation_fit_counts_its_streams_the_pending_run_and_the_maps(method, fit_on):
    config, _, _, total = _sizes()
    settings = SGLPConfig(compensation=method, compensation_fit=fit_on, **SETTINGS)
    fit = plan_memory(config, settings, dtype=torch.float32).phases["compensation fit"]["cpu"]
    state = 8 * 16 * 32 * 4  # 128 calibration tokens, width 32, float32
    streams = [part for part in fit if part.startswith("hidden states of the original network")]
    assert len(streams) == 1 and fit[streams[0]] == (1 if fit_on == "original" else 2) * state
    assert fit["M and Y of the run being fitted, every calibration batch"] == 2 * state
    assert fit["Gram sums of one run and the maps of every run (float64)"] == (2 + 2) * 32 * 32 * 8  # drop 2
    assert fit["whole model"] == total * 4
    assert ("M and h_b - Y of the fitted tokens (float32, cosine)" in fit) == (method == "cosine")
    assert "compensation fit" not in plan_memory(config, SGLPConfig(**SETTINGS), dtype=torch.float32).phases


def test_the_narrowed_heads_of_the_loss_batches_are_planned_where_the_head_is_narrowed():
    """loss_vocabulary None on a vocabulary of 16384 tokens or more: each loss batch's narrowed
    head and each screen's (one loss batch and two screens here), every one the estimated subset's
    columns × hidden size; none with the whole head, a small vocabulary or a peer."""
    from sglp_llm.passes.head import subset_columns

    config = tiny_config("llama", num_layers=6, vocab_size=20000)
    chosen = SGLPConfig(**SETTINGS, loss_vocabulary=None)
    plan = plan_memory(config, chosen, dtype=torch.float32)
    columns = subset_columns(32, 4 * 15, 20000)
    assert columns == round(1024 + 4 * 32 * 60**0.5) < 20000
    name = "the head narrowed to each loss batch's vocabulary subset"
    assert plan.phases["loss check"]["cpu"][name] == 3 * columns * config.hidden_size * 4
    whole = plan_memory(config, SGLPConfig(**SETTINGS, loss_vocabulary=0), dtype=torch.float32)
    small = plan_memory(tiny_config("llama", num_layers=6), chosen, dtype=torch.float32)
    sleb = plan_memory(config, chosen.replace(method="sleb"), dtype=torch.float32)
    assert all(name not in p.phases["loss check"]["cpu"] for p in (whole, small, sleb))
