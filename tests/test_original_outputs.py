"""The statistics pass keeps the original network's block outputs on the loss check's batches, and
the loss check starts from them: the same statistics and the same steps as when it runs its own
first forward, one forward over its tokens fewer."""

from __future__ import annotations

import pytest
import torch
from transformers import PretrainedConfig

from sglp_llm import SGLPConfig, analyze
from sglp_llm.model.blocks import DecoderBlocks
from sglp_llm.model.handle import ModelHandle
from sglp_llm.passes.hooked import hooked_pass
from sglp_llm.passes.original_outputs import OriginalOutputs
from sglp_llm.selection.removal import RemovalLoss
from test_sequential import TupleBlocksLM
from tiny_models import tiny_batch, tiny_model

SEQ, BLOCKS = 16, 7


class BlockCalls:
    """Positions the decoder blocks ran on, from forward pre-hooks."""

    def __init__(self, model):
        self.tokens = 0
        for layer in ModelHandle.of(model).layers:
            layer.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.tokens += hidden.shape[0] * hidden.shape[1]


def _analyze(family, monkeypatch, keep: bool, **settings):
    """A plan with the outputs kept by the statistics pass (`keep`) or not, and the block positions run."""
    if not keep:
        monkeypatch.setattr(SGLPConfig, "keeps_original_outputs", property(lambda config: False))
    model = tiny_model(family, num_layers=BLOCKS)
    calls = BlockCalls(model)
    batches = [tiny_batch(batch_size=2, seq_len=SEQ, seed=s) for s in range(4)]
    config = SGLPConfig(seq_len=SEQ, n_samples=8, batch_size=2, verify=False, stability_check=False, **settings)
    return analyze(model, batches, config, progress=False), calls.tokens


@pytest.mark.parametrize("family, settings", [
    ("llama", {"drop": 3, "loss_tokens": 4 * SEQ}),  # the default search: screened, lazy
    ("gemma3_text", {"drop": 2, "loss_tokens": 4 * SEQ, "loss_objective": "kl"}),
    ("qwen2", {"drop": 2, "loss_tokens": 4 * SEQ, "offload": "sequential"}),  # blocks run one at a time
    ("llama", {"drop": 2, "loss_tokens": 4 * SEQ, "loss_lazy": False, "loss_screen_samples": 0}),
    # SGLP's groups and gradient shortlist: the statistics pass runs a backward as well
    ("mistral", {"drop": 2, "loss_tokens": 4 * SEQ, "loss_candidates": 2}),
])
def test_the_loss_check_takes_the_same_steps_one_forward_cheaper(family, settings, monkeypatch):
    kept, kept_tokens = _analyze(family, monkeypatch, True, **settings)
    plain, plain_tokens = _analyze(family, monkeypatch, False, **settings)
    assert kept.dropped == plain.dropped
    assert kept.extra["loss_check"]["steps"] == plain.extra["loss_check"]["steps"]  # every loss, exactly
    assert kept.extra["loss_check"]["removal_losses"] == plain.extra["loss_check"]["removal_losses"]
    assert kept.cka == plain.cka
    # the first forward over the loss batches (4 windows) is not run again; with the screen, its
    # sequence's either
    screened = settings.get("loss_screen_samples", 1) * SEQ * BLOCKS
    assert plain_tokens - kept_tokens == 4 * SEQ * BLOCKS + screened


def test_a_last_loss_batch_cut_short_starts_from_the_rows_it_holds(monkeypatch):
    """loss_tokens covering 3 windows of batches of 2: the second batch's first row only. The kept
    outputs of its whole batch are cut to that row; the losses agree to float rounding."""
    kept, kept_tokens = _analyze("llama", monkeypatch, True, drop=2, loss_tokens=3 * SEQ)
    plain, plain_tokens = _analyze("llama", monkeypatch, False, drop=2, loss_tokens=3 * SEQ)
    assert kept.dropped == plain.dropped
    for a, b in zip(kept.extra["loss_check"]["steps"], plain.extra["loss_check"]["steps"]):
        assert a["block"] == b["block"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert plain_tokens - kept_tokens == 3 * SEQ * BLOCKS + SEQ * BLOCKS


def _kept(model, handle, batches, n_batches, indices=None):
    indices = range(len(batches)) if indices is None else indices
    original = OriginalOutputs(batches, indices, n_batches, to_cpu=False)
    with torch.no_grad():
        original.arity = hooked_pass(handle, [batches[i] for i in indices], [original], progress=False)
    return original


def test_only_the_kept_batches_or_their_first_are_matched():
    model = tiny_model("llama", num_layers=4).eval()
    handle = ModelHandle.of(model)
    batches = [tiny_batch(batch_size=2, seq_len=SEQ, seed=s) for s in range(3)]
    original = _kept(model, handle, batches, 2)
    assert set(original.outputs) == set(range(4)) and all(set(o) == {0, 1} for o in original.outputs.values())
    assert original.for_batches(batches[:2]) is not None and original.for_batches(batches[:1]) is not None
    first_row = [{k: v[:1] for k, v in batches[0].items()}]
    assert original.for_batches(first_row)[3][0].shape[0] == 1
    assert original.for_batches(batches) is None  # a third batch was not kept
    assert original.for_batches(batches[1:2]) is None  # not the first
    other = [tiny_batch(batch_size=2, seq_len=SEQ, seed=9)]
    assert original.for_batches(other) is None
    resumed = _kept(model, handle, batches, 2, indices=[1, 2])  # batch 0 came from a checkpoint
    assert resumed.for_batches(batches[:2]) is None


def test_batches_cut_at_any_row_are_matched_from_the_row_they_start_at():
    """A loss check's halves: the kept batches' rows cut into other batches (3 rows of 2+2: [1] |
    [1, 2]), the second half found from its first row on; a row out of place is not matched."""
    model = tiny_model("llama", num_layers=4).eval()
    handle = ModelHandle.of(model)
    batches = [tiny_batch(batch_size=2, seq_len=SEQ, seed=s) for s in range(2)]
    original = _kept(model, handle, batches, 2)
    rows = lambda b, i, j: {k: v[i:j] for k, v in batches[b].items()}  # noqa: E731
    first, second = [rows(0, 0, 1)], [rows(0, 1, 2), rows(1, 0, 2)]
    whole = original.for_batches(first + second)
    assert [o.shape[0] for o in whole[3]] == [1, 1, 2]
    found = original.for_batches(second, first_row=1)
    assert torch.equal(found[2][0], original.outputs[2][0][1:2]) and torch.equal(found[2][1], original.outputs[2][1])
    assert original.for_batches(second) is None  # from row 0 the rows differ
    assert original.for_batches([rows(1, 0, 2)], first_row=1) is None
    assert original.for_batches([rows(0, 1, 2), rows(1, 0, 1), rows(1, 0, 1)], first_row=1) is None  # a row twice


def test_blocks_that_return_tuples_are_handed_their_outputs_as_tuples():
    """The model's own loop reads `layer(...)[0]`: a kept state replayed bare would be its first row."""
    model = TupleBlocksLM().eval()
    model.config = PretrainedConfig(num_hidden_layers=4)  # what a removal rewrites
    handle = ModelHandle(model, DecoderBlocks(path="layers", parent=model, attribute="layers", config=model.config))
    batches = [tiny_batch(batch_size=2, seq_len=SEQ, seed=s) for s in range(2)]
    original = _kept(model, handle, batches, 2)
    assert original.arity == 2  # (hidden states, None)
    seeded, plain = RemovalLoss(handle, batches, original=original), RemovalLoss(handle, batches)
    assert seeded.current() == plain.current()
    for block in range(4):
        assert seeded.measure(block) == plain.measure(block)
