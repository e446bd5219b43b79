"""Sequential onloading: the same statistics and choices as the plain hooked pass, one block on the
device at a time, blocks read from disk, the model left as it was, and clear refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sglp_llm import ConfigError, SGLPConfig, analyze
from sglp_llm.api import statistics_key
from sglp_llm.model.blocks import DecoderBlocks, find_decoder_blocks
from sglp_llm.model.handle import ModelHandle
from sglp_llm.passes.capture import capture_blocks
from sglp_llm.statistics.cka import MinibatchCKA
from sglp_llm.cli import build_parser, resolve_settings
from sglp_llm.statistics.score import BlockGradNorms, GateScores
from sglp_llm.passes.loss import causal_lm_loss, grad_only_for
from sglp_llm.passes.sequential import sequential_pass
from sglp_llm.model.offload import BLOCK_LOADER_ATTRIBUTE, MoveBlocks, load_with_blocks_on_disk
from tiny_models import tiny_batch, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tiny_architectures import tiny_causal_lm  # noqa: E402

# block scoring: the selection then runs no model, so every block run is the statistics pass's
# the blocks onloaded are counted here: the stability halves (tests/test_stability.py) would onload them again
CONFIG = dict(drop=2, scoring="block", cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4, stability_check=False)
L = 6


def _batches():
    """Right padding in the first batch, so the recorded attention masks matter."""
    return [tiny_batch(batch_size=4, seq_len=16, seed=s, pad_last=p) for s, p in ((0, 5), (1, 0))]


def _assert_same_plans(plain, sequential):
    torch.testing.assert_close(torch.tensor(sequential.cka), torch.tensor(plain.cka), rtol=1e-4, atol=1e-6)
    # angular distance has no score (None) where no run of n blocks starts
    scores = [torch.tensor([0.0 if x is None else x for x in plan.scores]) for plan in (plain, sequential)]
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=0)
    assert sequential.dropped == plain.dropped and sequential.segments == plain.segments


# llama; mistral and gemma3_text (sliding and full attention layers: a mask per layer type);
# qwen2 (sliding window from a layer on); gemma2 (final logit softcapping); qwen2_moe (experts)
# The paper's GradNorm pass also measures the gate scores, which the plan keeps beside it.
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text", "qwen2", "gemma2", "qwen2_moe"])
def test_sglp_statistics_and_choice_match_the_plain_pass(family):
    model = tiny_model(family, num_layers=L)
    config = SGLPConfig(gradient_score="gradnorm", **CONFIG)
    plain = analyze(model, _batches(), config, progress=False)
    sequential = analyze(model, _batches(), config.replace(offload="sequential"), progress=False)
    _assert_same_plans(plain, sequential)
    for name in ("taylor", "fisher", "gradnorm"):
        torch.testing.assert_close(
            torch.tensor(sequential.extra["gradient_scores"][name]), torch.tensor(plain.extra["gradient_scores"][name]),
            rtol=1e-4, atol=1e-9,
        )


# the gate scores alone: the backward computes no weight gradient
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("score", ["taylor", "fisher"])
def test_gate_scores_match_the_plain_pass(family, score):
    model = tiny_model(family, num_layers=L)
    config = SGLPConfig(gradient_score=score, **CONFIG)
    plain = analyze(model, _batches(), config, progress=False)
    sequential = analyze(model, _batches(), config.replace(offload="sequential"), progress=False)
    _assert_same_plans(plain, sequential)
    assert plain.score_kind == score and "gradnorm" not in plain.extra["gradient_scores"]


@pytest.mark.parametrize("method", ["block-influence", "angular"])
def test_baseline_scores_match_the_plain_pass(method):
    model = tiny_model("gemma3_text", num_layers=L)
    config = SGLPConfig(method=method, **CONFIG)
    plain = analyze(model, _batches(), config, progress=False)
    sequential = analyze(model, _batches(), config.replace(offload="sequential"), progress=False)
    _assert_same_plans(plain, sequential)


def test_model_is_left_unchanged():
    model = tiny_model("gemma2", num_layers=L)
    model.model.embed_tokens.weight.requires_grad_(False)  # flags that differ must come back as they were
    layers = find_decoder_blocks(model).layers
    blocks, params = list(layers), list(model.parameters())
    flags = [p.requires_grad for p in params]
    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch).logits
    analyze(model, _batches(), SGLPConfig(offload="sequential", **CONFIG), progress=False)
    assert list(layers) == blocks and list(model.parameters()) == params
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params) and all(p.device.type == "cpu" for p in params)
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


class TrackingLoader(MoveBlocks):
    """Moves blocks like the default loader and records which are onloaded when a block runs."""

    def __init__(self) -> None:
        super().__init__()
        self.onloaded: set[int] = set()
        self.most_at_once = 0
        self.runs: list[tuple[int, set[int]]] = []

    def onload(self, index, block, device):
        super().onload(index, block, device)
        self.onloaded.add(index)
        self.most_at_once = max(self.most_at_once, len(self.onloaded))

    def offload(self, index, block):
        self.onloaded.remove(index)
        super().offload(index, block)


# SGLP: a forward and a backward pass; the gate scores alone need no rerun of the first block
@pytest.mark.parametrize("method, score, runs", [
    ("sglp", "gradnorm", 2 * L), ("sglp", "taylor", 2 * L - 1), ("block-influence", "gradnorm", L),
])
def test_one_block_at_a_time(method, score, runs):
    model = tiny_model("mistral", num_layers=L)
    loader = TrackingLoader()
    setattr(model, BLOCK_LOADER_ATTRIBUTE, loader)
    layers = find_decoder_blocks(model).layers
    for index, block in enumerate(layers):
        block.register_forward_pre_hook(
            lambda module, args, index=index: loader.runs.append((index, set(loader.onloaded)))
        )
    analyze(model, _batches(), SGLPConfig(method=method, gradient_score=score, offload="sequential", **CONFIG), progress=False)
    assert loader.most_at_once == 1 and not loader.onloaded
    # every block runs once per batch and pass, each time the only block onloaded
    assert all(onloaded == {index} for index, onloaded in loader.runs)
    assert len(loader.runs) == runs * len(_batches())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3_text ties lm_head to the embeddings
def test_blocks_read_from_disk_give_the_same_plan(family, tmp_path):
    model = tiny_model(family, num_layers=L)
    model.save_pretrained(tmp_path)
    lazy = load_with_blocks_on_disk(tmp_path)
    block_params = list(find_decoder_blocks(lazy).layers.parameters())
    assert all(p.is_meta for p in block_params)
    if model.config.tie_word_embeddings:
        assert lazy.lm_head.weight is lazy.get_input_embeddings().weight
    plain = analyze(model, _batches(), SGLPConfig(**CONFIG), progress=False)
    sequential = analyze(lazy, _batches(), SGLPConfig(offload="sequential", **CONFIG), progress=False)
    _assert_same_plans(plain, sequential)
    # every block went back to disk: the same (meta) parameters, no gradients
    assert list(find_decoder_blocks(lazy).layers.parameters()) == block_params
    assert all(p.is_meta and p.grad is None and p.requires_grad for p in block_params)
    with pytest.raises(RuntimeError, match="blocks are on disk"):  # the subset search runs the network
        analyze(lazy, _batches(), SGLPConfig(offload="sequential", **{**CONFIG, "groups": True, "scoring": "subset"}),
                progress=False)


# the default selection (the loss check and its screen) and SLEB, block by block
LOSS_CONFIG = dict(drop=2, cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4, loss_tokens=6 * 16,
                   stability_check=False)


def _assert_same_loss_choices(plain, sequential):
    assert sequential.dropped == plain.dropped
    for key in ("loss_check", "sleb_steps"):
        if key in plain.extra:
            steps = [p.extra[key]["steps"] if key == "loss_check" else p.extra[key] for p in (plain, sequential)]
            assert [s["block"] for s in steps[1]] == [s["block"] for s in steps[0]]
            assert [s["loss"] for s in steps[1]] == pytest.approx([s["loss"] for s in steps[0]], rel=1e-5)
    if "loss_check" in plain.extra:
        first = [p.extra["loss_check"]["removal_losses"] for p in (plain, sequential)]
        assert [x is None for x in first[1]] == [x is None for x in first[0]]
        assert [x for x in first[1] if x is not None] == pytest.approx([x for x in first[0] if x is not None], rel=1e-5)


# the head narrowed to each sequence's 3 likeliest tokens and a sample of the rest (`--loss-vocabulary`)
NARROWED = {"loss_vocabulary": 3}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2", "qwen2_moe"])
@pytest.mark.parametrize("settings", [{}, {"method": "sleb"}, NARROWED])
def test_loss_selections_run_block_by_block_with_the_same_choices(family, settings):
    model = tiny_model(family, num_layers=L)
    config = SGLPConfig(**LOSS_CONFIG, **settings)
    plain = analyze(model, _batches(), config, progress=False)
    sequential = analyze(model, _batches(), config.replace(offload="sequential"), progress=False)
    _assert_same_loss_choices(plain, sequential)


@pytest.mark.parametrize("family", ["bloom", "cpmant", "rwkv"])
def test_blocks_returning_more_than_the_hidden_states_run_block_by_block_with_the_same_choices(family):
    """BLOOM's blocks return their attention weights unasked (transformers 5.25), CPM-Ant's and
    RWKV's loops unpack a fixed count: stand-ins shaped as the blocks' outputs, the rest None,
    give the block-by-block run the whole model's losses and choices (they were refused or
    crashed with a bare tensor)."""
    model = tiny_causal_lm(family, num_blocks=L)
    config = SGLPConfig(**LOSS_CONFIG)
    plain = analyze(model, _batches(), config, progress=False)
    sequential = analyze(model, _batches(), config.replace(offload="sequential"), progress=False)
    _assert_same_loss_choices(plain, sequential)


@pytest.mark.parametrize("settings", [{}, {"method": "sleb"}])
def test_loss_selections_onload_one_block_at_a_time(settings):
    model = tiny_model("mistral", num_layers=L)
    loader = TrackingLoader()
    setattr(model, BLOCK_LOADER_ATTRIBUTE, loader)
    for index, block in enumerate(find_decoder_blocks(model).layers):
        block.register_forward_pre_hook(
            lambda module, args, index=index: loader.runs.append((index, set(loader.onloaded)))
        )
    analyze(model, _batches(), SGLPConfig(offload="sequential", **LOSS_CONFIG, **settings), progress=False)
    assert loader.most_at_once == 1 and not loader.onloaded
    assert loader.runs and all(onloaded == {index} for index, onloaded in loader.runs)


@pytest.mark.parametrize("settings", [{}, {"method": "sleb"}, NARROWED])
def test_loss_selections_read_blocks_from_disk_with_the_same_choices(settings, tmp_path):
    model = tiny_model("gemma3_text", num_layers=L)
    model.save_pretrained(tmp_path)
    lazy = load_with_blocks_on_disk(tmp_path)
    plain = analyze(model, _batches(), SGLPConfig(**LOSS_CONFIG, **settings), progress=False)
    sequential = analyze(lazy, _batches(), SGLPConfig(offload="sequential", **LOSS_CONFIG, **settings), progress=False)
    _assert_same_loss_choices(plain, sequential)
    assert all(p.is_meta for p in find_decoder_blocks(lazy).layers.parameters())


class TupleBlock(nn.Module):
    """A block in the pre-v5 convention: hidden states in, a tuple (hidden states, ...) out."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)

    def forward(self, hidden_states, mask=None):
        return (hidden_states + torch.tanh(self.mix(hidden_states)) * mask, None)


class TupleBlocksLM(nn.Module):
    """The smallest causal LM whose blocks return tuples and take a keyword argument."""

    def __init__(self, vocab: int = 96, width: int = 16, num_blocks: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(TupleBlock(width) for _ in range(num_blocks))
        self.head = nn.Linear(width, vocab)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask, labels=None, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, mask=attention_mask[..., None].float())[0]
        logits = self.head(hidden)  # no `logits_to_keep`: the loss is taken from all logits at once
        loss = None if labels is None else F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def test_blocks_that_return_tuples():
    model = TupleBlocksLM().eval()
    batches = _batches()
    plain_cka, plain_grads = MinibatchCKA(4, minibatch_tokens=16), BlockGradNorms.for_blocks(model.layers)
    plain_gates = GateScores(4)
    with capture_blocks(model.layers, plain_cka.on_block), grad_only_for(model, plain_grads.parameters()):
        with plain_grads.hooks(), plain_gates.hooks(model.layers):
            for batch in batches:
                plain_cka.start_batch(batch["attention_mask"].bool())
                plain_gates.start_batch(batch["attention_mask"].bool())
                loss = causal_lm_loss(model, batch)
                plain_cka.finish_batch()
                loss.backward()
                plain_grads.end_batch()
    cka, grads, gates = MinibatchCKA(4, minibatch_tokens=16), BlockGradNorms.for_blocks(model.layers), GateScores(4)
    # a module with no transformers config: its blocks are named, not found
    handle = ModelHandle(model, DecoderBlocks(path="layers", parent=model, attribute="layers", config=None))
    assert sequential_pass(handle, batches, [cka], grads, gates, progress=False) == 2  # its blocks return pairs
    torch.testing.assert_close(cka.compute(), plain_cka.compute(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads.compute(), plain_grads.compute(), rtol=1e-4, atol=0)
    for name, value in gates.compute().items():
        torch.testing.assert_close(value, plain_gates.compute()[name], rtol=1e-4, atol=1e-9)


def test_refusals_and_settings():
    with pytest.raises(ConfigError, match="offload"):
        SGLPConfig(drop=1, offload="disk")
    config = SGLPConfig(drop=1)
    assert statistics_key(config, 1) != statistics_key(config.replace(offload="sequential"), 1)
    args = build_parser().parse_args(["analyze", "--drop", "2", "--offload", "sequential"])
    assert resolve_settings(args)[1].offload == "sequential"

    with torch.device("meta"):
        block = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        MoveBlocks().onload(0, block, torch.device("cpu"))


def test_checkpoints_with_converted_weight_names_are_refused(tmp_path):
    tiny_model("qwen2_moe", num_layers=2).save_pretrained(tmp_path)  # experts are fused on load
    with pytest.raises(ValueError, match="converts them on load"):
        load_with_blocks_on_disk(tmp_path)


@pytest.mark.parametrize("score", ["gradnorm", "taylor"])
def test_hidden_states_spilled_to_disk_give_the_same_statistics_and_are_removed(score, tmp_path, monkeypatch):
    """On disk, only one block's states for each batch are in memory at a time; the statistics and
    gradient scores are those of the in-memory pass, and the temporary folder goes at the end."""
    import sglp_llm.passes.hidden_states as hidden_states

    model = tiny_model("gemma3_text", num_layers=L)
    config = SGLPConfig(offload="sequential", gradient_score=score, **CONFIG)
    memory = analyze(model, _batches(), config.replace(hidden_states="memory"), progress=False)
    written, held = [], []
    put = hidden_states.BlockStates.put

    def spy_put(self, position, states):
        assert self.on_disk and self.folder.parent == tmp_path
        written.append(position)
        put(self, position, states)
        held.append(len(self._memory))

    monkeypatch.setattr(hidden_states.BlockStates, "put", spy_put)
    disk = analyze(model, _batches(), config.replace(hidden_states="disk", hidden_states_dir=str(tmp_path)),
                   progress=False)
    _assert_same_plans(memory, disk)
    for name, values in memory.extra["gradient_scores"].items():
        torch.testing.assert_close(torch.tensor(disk.extra["gradient_scores"][name]), torch.tensor(values), rtol=1e-6, atol=0)
    assert written == list(range(L + 1)) and not any(held)  # nothing kept in memory by the store
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_auto_hidden_states_spill_only_what_would_not_fit(monkeypatch):
    import sglp_llm.passes.hidden_states as hidden_states

    monkeypatch.setattr(hidden_states, "available_memory", lambda: 1000)
    assert hidden_states.spills("auto", 501) and not hidden_states.spills("auto", 500)
    assert hidden_states.spills("disk", 1) and not hidden_states.spills("memory", 10**15)
    with pytest.raises(ConfigError, match="`hidden_states` must be one of"):
        SGLPConfig(drop=1, hidden_states="ssd")
    with pytest.raises(ConfigError, match="is not an existing folder"):
        SGLPConfig(drop=1, hidden_states_dir="/no/such/folder")


def test_the_lazy_search_measures_candidates_together_when_blocks_are_read(monkeypatch):
    """Blocks read one at a time: the lazy search measures its three most promising candidates in
    one pass, for the same steps (blocks, losses, candidates used) as measuring one at a time, and
    fewer block reads."""
    from sglp_llm.model.offload import MoveBlocks
    from sglp_llm.selection import loss_check
    from sglp_llm.selection.removal import BlockwiseRemovalLoss

    reads = []
    original = MoveBlocks.onload
    monkeypatch.setattr(MoveBlocks, "onload", lambda self, index, block, device: (reads.append(index), original(self, index, block, device)))
    measured = []  # (blocks removed so far, candidates) of every shared pass
    many = BlockwiseRemovalLoss.measure_many
    monkeypatch.setattr(BlockwiseRemovalLoss, "measure_many",
                        lambda self, blocks: (measured.append((len(self.removed), list(blocks))), many(self, blocks))[1])
    model = tiny_model("llama", num_layers=10)
    # no screen: the first step measures every candidate, as the lazy search finds them unmeasured
    config = SGLPConfig(offload="sequential", loss_screen_samples=0, **{**LOSS_CONFIG, "drop": 5})
    runs = {}
    for together in (1, 3):
        monkeypatch.setattr(loss_check, "LAZY_MEASURED_TOGETHER", together)
        reads.clear()
        plan = analyze(model, _batches(), config, progress=False)
        runs[together] = plan.extra["loss_check"]["steps"], plan.dropped, len(reads)
    assert runs[3][:2] == runs[1][:2]
    assert runs[1][0][0]["measured"] == 8  # every unprotected block, one pass each when measured alone
    assert runs[3][2] < runs[1][2]
    # within a step (a removal loss and a number of blocks removed), no candidate is measured twice
    per_step: dict = {}
    for step, blocks in measured:
        per_step.setdefault(step, []).extend(blocks)
    assert measured and all(len(blocks) == len(set(blocks)) for blocks in per_step.values())
