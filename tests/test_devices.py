"""Big-model settings on tiny models: device maps with blocks offloaded to disk, gradient
checkpointing and half precision give the plain statistics, and overflow is caught by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglp_llm import ConfigError, SGLPConfig, analyze
from sglp_llm.api import collect_block_statistics
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.data import prepare_calibration
from sglp_llm.model.devices import parse_device_map, parse_max_memory
from sglp_llm.passes.loss import activation_checkpointing
from tiny_models import save_tiny_model, tiny_batch, tiny_model

CONFIG = dict(cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4)
# some blocks in memory, others (and the embeddings and head) read from disk at every forward
MIXED_MAP = {
    "model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
    "model.layers.3": "disk", "model.layers.4": "disk", "model.layers.5": "cpu", "model.norm": "cpu",
    "model.rotary_emb": "cpu", "lm_head": "disk",
}


def _batches(n=2):
    return [tiny_batch(batch_size=4, seq_len=16, seed=s) for s in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-6")
    save_tiny_model(path, "llama", num_layers=6)
    return path


def _statistics(model, config, batches):
    blocks = find_decoder_blocks(model)
    calibration = prepare_calibration(batches, None, config)
    return collect_block_statistics(model, calibration, config, config.resolve_drop(len(blocks.layers)), progress=False)


def test_device_map_and_max_memory_values_parse():
    assert parse_device_map("auto") == "auto" and parse_device_map("cuda:1") == "cuda:1"
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "disk"}') == {"model.layers.0": 0, "lm_head": "disk"}
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory('{"0": "20GiB", "cpu": 1000}') == {0: "20GiB", "cpu": 1000}
    with pytest.raises(ConfigError, match="--device-map takes auto"):
        parse_device_map("everywhere")
    with pytest.raises(ConfigError, match="DEVICE=LIMIT pairs, e.g. --max-memory 0=20GiB"):
        parse_max_memory("20GiB")
    with pytest.raises(ConfigError, match="no file"):
        parse_device_map("missing.json")


@pytest.mark.filterwarnings("ignore:accelerate offloads weights of the network")  # the subset search's
def test_blocks_offloaded_to_disk_give_the_plain_statistics_and_plan(model_dir, tmp_path):
    """Offloaded weights are new Parameters at every forward: GradNorm must still see them; the
    gate scores need no weight gradient at all."""
    offloaded = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map=MIXED_MAP, offload_folder=tmp_path / "offload", dtype=torch.float32
    ).eval()
    assert any(p.is_meta for p in find_decoder_blocks(offloaded).layers[1].parameters())
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for scoring, score in (("block", "gradnorm"), ("subset", "gradnorm"), ("block", "taylor"), ("loss", "taylor")):
        config = SGLPConfig(drop=2, groups=True, num_segments=2, scoring=scoring, max_candidates=3, gradient_score=score, **CONFIG)
        if score == "taylor":  # no weight gradient, so no warning
            got = analyze(offloaded, _batches(), config, progress=False)
        else:
            with pytest.warns(UserWarning, match="offloads weights of block 1, block 3, block 4: .*saves no memory for GradNorm.*--offload sequential"):
                got = analyze(offloaded, _batches(), config, progress=False)
        expected = analyze(plain, _batches(), config, progress=False)
        torch.testing.assert_close(torch.tensor(got.cka), torch.tensor(expected.cka), rtol=1e-6, atol=1e-9)
        scores = [[math.nan if s is None else s for s in plan.scores] for plan in (got, expected)]
        torch.testing.assert_close(torch.tensor(scores[0]), torch.tensor(scores[1]), rtol=1e-5, atol=0, equal_nan=True)
        assert all(s > 0 or score != "gradnorm" for s in scores[0] if not math.isnan(s)) and got.dropped == expected.dropped
        for segment, search in expected.extra.get("subset_search", {}).items():
            assert got.extra["subset_search"][segment]["best_score"] == pytest.approx(search["best_score"], rel=1e-6)
        steps = [plan.extra.get("loss_check", {}).get("steps", []) for plan in (got, expected)]
        assert len(steps[0]) == len(steps[1]) == (2 if scoring == "loss" else 0)
        for step, plain_step in zip(*steps):
            assert step["block"] == plain_step["block"] and step["loss"] == pytest.approx(plain_step["loss"], rel=1e-6)
    assert all(p.grad is None for p in offloaded.parameters())


@pytest.mark.filterwarnings("ignore:accelerate offloads weights")
def test_cli_passes_device_map_max_memory_and_offload_folder(model_dir, tmp_path, monkeypatch):
    import sglp_llm.model.loading as loading
    from sglp_llm.cli import main

    seen = {}
    real = loading.load_model

    def spy(*args, **kwargs):
        seen.update(kwargs, loaded=real(*args, **kwargs))
        return seen["loaded"]

    monkeypatch.setattr(loading, "load_model", spy)
    (tmp_path / "map.json").write_text(json.dumps(MIXED_MAP))
    flags = ["analyze", "--model", str(model_dir), "--drop", "2", "--no-progress", "--seq-len", "16",
             "--n-samples", "4", "--batch-size", "4", "--cka-minibatch-tokens", "16"]
    # unset, the calibration is the model's own samples, but not from a device map's disk
    assert main([*flags, "--dataset", "builtin:stdlib-docs", "--report", str(tmp_path / "plain.json")]) == 0
    assert main([*flags, "--device-map", str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "off"),
                 "--max-memory", "cpu=1GiB", "--report", str(tmp_path / "offloaded.json")]) == 0
    assert seen["device_map"] == MIXED_MAP and seen["max_memory"] == {"cpu": "1GiB"}
    assert seen["offload_folder"] == str(tmp_path / "off")
    assert seen["loaded"].model.hf_device_map["model.layers.1"] == "disk"
    plain, offloaded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "offloaded"))
    assert offloaded["config"]["dataset"] == plain["config"]["dataset"] == "builtin:stdlib-docs"
    assert "its device map keeps weights on disk" in offloaded["extra"]["calibration_not_sampled"]
    assert offloaded["dropped"] == plain["dropped"]
    assert offloaded["scores"] == pytest.approx(plain["scores"], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_statistics_and_is_undone():
    model = tiny_model("qwen3", num_layers=6)
    layers = find_decoder_blocks(model).layers
    calls, forward = [], layers[2].mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    layers[2].mlp.forward = counted
    config = SGLPConfig(drop=2, scoring="block", gradient_score="gradnorm", **CONFIG)  # a backward to checkpoint
    plain = _statistics(model, config, _batches())
    assert len(calls) == 2
    checkpointed = _statistics(model, config.replace(gradient_checkpointing=True), _batches())
    assert len(calls) == 2 + 4, "each block must run again in the backward"
    torch.testing.assert_close(checkpointed.cka, plain.cka, rtol=0, atol=0)
    for name in ("gradnorm", "taylor", "fisher"):
        torch.testing.assert_close(
            torch.tensor(checkpointed.gradient_scores[name]), torch.tensor(plain.gradient_scores[name]), rtol=1e-5, atol=1e-9
        )
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not model.training and not any(layer.training for layer in layers)
    assert not getattr(model, "_require_grads_hooks", None)


def test_gradient_checkpointing_keeps_a_model_that_had_it_on():
    model = tiny_model("llama", num_layers=4)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with activation_checkpointing(model):
        pass
    assert all(layer.gradient_checkpointing for layer in find_decoder_blocks(model).layers)


def test_bfloat16_weights_give_finite_statistics_close_to_float32():
    reference = tiny_model("llama", num_layers=6)
    half = tiny_model("llama", num_layers=6).to(torch.bfloat16)
    config = SGLPConfig(drop=2, scoring="block", gradient_score="gradnorm", **CONFIG)
    expected, got = _statistics(reference, config, _batches()), _statistics(half, config, _batches())
    assert got.cka.dtype == torch.float64
    assert torch.isfinite(got.cka).all() and (got.cka - expected.cka).abs().max() < 0.02
    for name in ("gradnorm", "taylor", "fisher"):
        scores, reference_scores = torch.tensor(got.gradient_scores[name]), torch.tensor(expected.gradient_scores[name])
        assert torch.isfinite(scores).all()
        # the Taylor score changes sign: its error is measured against its largest value
        torch.testing.assert_close(scores, reference_scores, rtol=0.05, atol=0.05 * reference_scores.abs().max().item())


def test_nan_block_output_is_caught_naming_the_block():
    model = tiny_model("llama", num_layers=6)
    find_decoder_blocks(model).layers[3].register_forward_hook(lambda m, a, o: o * float("nan"))
    with pytest.raises(FloatingPointError, match=r"Block 3 produced NaN .*--dtype bfloat16 or --dtype float32"):
        analyze(model, _batches(), SGLPConfig(drop=2, **CONFIG), progress=False)


# the gradient of block 4's weights overflows, and that of its input (block 3's output) with them
@pytest.mark.parametrize("score, message", [
    ("gradnorm", "The gradient norm of block 4 is NaN or infinite on the calibration data, and so of the 4 blocks before it"),
    ("taylor", "The gradient at the output of block 3 is NaN or infinite on the calibration data, and so of the 3 blocks before it"),
])
@pytest.mark.parametrize("offload", ["none", "sequential"])
def test_infinite_gradient_is_caught_naming_the_block(score, message, offload):
    """The forward stays finite; only the gradient inside block 4's MLP overflows."""
    model = tiny_model("llama", num_layers=6)

    def overflow_backward(module, args, output):
        if output.requires_grad:  # not in the sequential forward, which runs without grad
            output.register_hook(lambda grad: grad * math.inf)

    find_decoder_blocks(model).layers[4].mlp.register_forward_hook(overflow_backward)
    config = SGLPConfig(drop=2, scoring="block", gradient_score=score, offload=offload, verify=False, **CONFIG)
    with pytest.raises(FloatingPointError, match=f"^{message}: .*--dtype bfloat16"):
        # verify=False: the hook needs grad, which the trial rewrite's forwards run without
        analyze(model, _batches(), config, progress=False)


@pytest.mark.parametrize("run, settings, n_gpus, expected_run, onload, note", [
    ({}, {}, 0, {}, None, "Running on the CPU (no GPU found)."),
    ({}, {}, 2, {"device_map": "auto"}, None, "pass --device-map cpu to stay on the CPU"),
    ({}, {"offload": "sequential"}, 1, {}, "cuda:0", "each block runs on cuda:0, the rest of the model in CPU memory"),
    ({"blocks_on_disk": True}, {"offload": "sequential"}, 1, {"blocks_on_disk": True}, "cuda:0",
     "the embeddings and head on cuda:0 too"),
    # the user said where: nothing is changed or printed
    ({"device_map": "cpu"}, {}, 1, {"device_map": "cpu"}, None, ""),
    ({}, {"offload": "sequential", "onload_device": "cpu"}, 1, {}, "cpu", ""),
])
def test_an_unplaced_run_goes_to_the_gpu_when_there_is_one_and_says_so(run, settings, n_gpus, expected_run, onload, note):
    from sglp_llm.model.devices import choose_devices

    placed, config, said = choose_devices(run, SGLPConfig(drop=1, **settings), n_gpus)
    assert placed == expected_run and config.onload_device == onload
    assert (note in said) if note else said == ""
    assert choose_devices({}, None, 1)[0] == {"device_map": "auto"}  # commands without an SGLPConfig


def test_the_plan_names_the_devices_it_ran_on():
    model = tiny_model("llama", num_layers=4)
    plan = analyze(model, [tiny_batch(batch_size=2, seq_len=16)], SGLPConfig(drop=1, scoring="block", cka_minibatch_tokens=8),
                   progress=False)
    assert plan.extra["devices"] == ["cpu"] and "; ran on cpu" in plan.summary().splitlines()[0]
    sequential = analyze(model, [tiny_batch(batch_size=2, seq_len=16)],
                         SGLPConfig(drop=1, scoring="block", cka_minibatch_tokens=8, offload="sequential", onload_device="cpu"),
                         progress=False)
    assert sequential.extra["devices"] == ["cpu"]
