"""RemovalLoss against the whole-network loss (calibration_nll) and a loss written out by hand."""

import pytest
import torch

from sglp_llm.selection.removal import RemovalLoss, calibration_nll
from sglp_llm.model.rewrite import skip_blocks
from tiny_models import FAMILIES, tiny_batch, tiny_model


def _batches():
    return [tiny_batch(batch_size=3, seq_len=14, seed=s, pad_last=4 * (s == 1)) for s in range(2)]


def test_calibration_nll_is_the_token_weighted_mean_nll():
    model, batches = tiny_model("llama", num_layers=5), _batches()
    total = count = 0.0
    with torch.no_grad(), skip_blocks(model, [1, 3]):
        for batch in batches:
            logits = model(**batch).logits[:, :-1]
            targets = batch["input_ids"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            mask = batch["attention_mask"][:, 1:].bool()
            total += nll[mask].sum().item()
            count += mask.sum().item()
    assert calibration_nll(model, batches, [1, 3]) == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_measurements_equal_whole_network_losses_along_a_greedy_path(family):
    """Removals in an order that invalidates kept outputs (a shallower removal after a deeper
    one) and measurements of the first block (nothing to reuse) and of the last."""
    model, batches = tiny_model(family, num_layers=7), _batches()
    removal = RemovalLoss(model, batches)
    runs = []
    for step in ([], [4], [4, 2], [4, 2, 5]):
        for extra in step[len(removal.removed):]:
            removal.remove(extra)
        runs.append((removal.current(), calibration_nll(model, batches, step)))
        for block in [b for b in range(7) if b not in step]:
            runs.append((removal.measure(block), calibration_nll(model, batches, step + [block])))
    assert len(runs) == 4 + 7 + 6 + 5 + 4
    for cached, whole in runs:
        assert cached == pytest.approx(whole, rel=1e-6, abs=1e-7)
    with pytest.raises(ValueError, match="Block 4 is removed already"):
        removal.measure(4)


def test_a_measurement_runs_only_the_blocks_after_the_removed_one():
    model, batches = tiny_model("llama", num_layers=6), _batches()
    calls = [0] * 6
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    removal = RemovalLoss(model, batches)
    removal.measure(4)  # one pass up to block 3 (blocks 0-3 kept), then blocks 5 on
    assert calls == [2, 2, 2, 2, 0, 2]
    removal.measure(3)  # from block 2's kept output: blocks 4 and 5
    assert calls == [2, 2, 2, 2, 2, 4]
    removal.measure(5)  # block 4's output: from block 3's kept output
    assert calls == [2, 2, 2, 2, 4, 4]
    removal.remove(2)  # outputs from block 2 on are no longer those of the network
    removal.measure(4)  # block 3's output again, from block 1's
    assert calls == [2, 2, 2, 4, 4, 6]
    removal.current()  # from block 3's kept output, keeping block 4's and 5's
    assert calls == [2, 2, 2, 4, 6, 8]
    removal.measure(5)  # from block 4's kept output: no block runs
    assert calls == [2, 2, 2, 4, 6, 8]


def _direct_kl(model, batches, skipped, top_k=None):
    """KL(original ‖ pruned) per predicted token, written out from the two models' full logits;
    with `top_k`, both distributions coarsened to the original's top-k tokens and the rest."""
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"][:, 1:].bool()
            p = torch.log_softmax(model(**batch).logits[:, :-1][mask].double(), -1)
            with skip_blocks(model, skipped):
                q = torch.log_softmax(model(**batch).logits[:, :-1][mask].double(), -1)
            if top_k is not None:
                top = p.topk(top_k, dim=-1).indices
                p_top, q_top = p.gather(1, top), q.gather(1, top)
                p = torch.cat([p_top, torch.log1p(-p_top.exp().sum(1, keepdim=True))], 1)
                q = torch.cat([q_top, torch.log1p(-q_top.exp().sum(1, keepdim=True))], 1)
            total += (p.exp() * (p - q)).sum().item()
            count += mask.sum().item()
    return total / count


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_kl_objective_is_the_kl_to_the_original_along_a_greedy_path(family, monkeypatch):
    """With every token kept (KL_TOP_K = vocabulary) the coarsened KL is the full KL."""
    import sglp_llm.selection.removal as removal_module
    from tiny_models import VOCAB

    monkeypatch.setattr(removal_module, "KL_TOP_K", VOCAB)
    model, batches = tiny_model(family, num_layers=6), _batches()
    removal = RemovalLoss(model, batches, objective="kl")
    assert removal.current() == pytest.approx(0.0, abs=1e-6)
    for block in (3, 1, 5):
        assert removal.measure(block) == pytest.approx(_direct_kl(model, batches, removal.removed + [block]), rel=1e-4)
        removal.remove(block)
    assert removal.current() == pytest.approx(_direct_kl(model, batches, [3, 1, 5]), rel=1e-4)
    assert removal.loss_without([2]) == pytest.approx(_direct_kl(model, batches, [2]), rel=1e-4)


def test_the_kl_objective_with_few_tokens_is_the_kl_of_the_coarsened_distributions(monkeypatch):
    """A reference of the top 5 tokens and the rest: the KL of those 6 classes, at most the full KL."""
    import sglp_llm.selection.removal as removal_module

    monkeypatch.setattr(removal_module, "KL_TOP_K", 5)
    model, batches = tiny_model("llama", num_layers=5), _batches()
    coarse = RemovalLoss(model, batches, objective="kl").measure(2)
    assert coarse == pytest.approx(_direct_kl(model, batches, [2], top_k=5), rel=1e-4)
    assert 0 < coarse < _direct_kl(model, batches, [2])


def test_blockwise_kl_equals_the_in_memory_kl():
    from sglp_llm.selection.removal import BlockwiseRemovalLoss

    model, batches = tiny_model("qwen2", num_layers=6), _batches()
    plain, blockwise = RemovalLoss(model, batches, objective="kl"), BlockwiseRemovalLoss(model, batches, objective="kl")
    for block in (2, 4):
        assert blockwise.measure(block) == pytest.approx(plain.measure(block), rel=1e-5)
        plain.remove(block), blockwise.remove(block)
    assert blockwise.current() == pytest.approx(plain.current(), rel=1e-5)
    with pytest.raises(ValueError, match="objective='mse'"):
        RemovalLoss(model, batches, objective="mse")


def test_a_branch_measures_its_own_set_and_leaves_its_parent_alone():
    model, batches = tiny_model("llama", num_layers=6), _batches()
    parent = RemovalLoss(model, batches)
    parent.measure(3)
    child = parent.branch(3)
    assert (parent.removed, child.removed) == ([], [3])
    assert child.measure(1) == pytest.approx(calibration_nll(model, batches, [3, 1]), rel=1e-6)
    assert parent.measure(1) == pytest.approx(calibration_nll(model, batches, [1]), rel=1e-6)


def test_a_position_sample_takes_one_position_from_each_of_equal_strata():
    from sglp_llm.passes.head import position_sample

    assert position_sample(255, 1.0, seed=0) is None
    sample = position_sample(255, 0.25, seed=3)
    assert len(sample) == 64 and torch.equal(sample, position_sample(255, 0.25, seed=3))
    edges = [i * 255 // 64 for i in range(65)]
    assert all(edges[i] <= int(p) < edges[i + 1] for i, p in enumerate(sample))
    assert not torch.equal(sample, position_sample(255, 0.25, seed=4))
    assert len(position_sample(6, 0.01, seed=0)) == 1


def _nll_at(model, batches, skipped, positions):
    """The mean next-token NLL over each batch's `positions` only (non-padding), from full logits."""
    total = count = 0.0
    with torch.no_grad(), skip_blocks(model, skipped):
        for batch, scored in zip(batches, positions):
            logits = model(**batch).logits[:, :-1][:, scored]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:][:, scored], reduction="none")
            mask = batch["attention_mask"][:, 1:][:, scored].bool()
            total += nll[mask].sum().item()
            count += mask.sum().item()
    return total / count


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_head_on_some_positions_scores_the_loss_at_those_positions(family, monkeypatch):
    """The same positions for every candidate (the padded batch's too), whatever the chunking of
    the head and whether the blocks run in the model's forward or one at a time."""
    import sglp_llm.passes.head as head
    from sglp_llm.passes.head import position_sample
    from sglp_llm.selection.removal import BlockwiseRemovalLoss
    from tiny_models import VOCAB

    model, batches = tiny_model(family, num_layers=6), _batches()
    positions = [position_sample(13, 0.3, seed=5 + i) for i in range(2)]
    removal = RemovalLoss(model, batches, position_share=0.3, seed=5)
    blockwise = BlockwiseRemovalLoss(model, batches, position_share=0.3, seed=5)
    assert removal.current() == pytest.approx(_nll_at(model, batches, [], positions), rel=1e-6)
    monkeypatch.setattr(head, "MAX_LOGITS_BYTES", 2 * 3 * VOCAB * 4)  # chunks of 2 positions
    for block in (3, 1):
        expected = _nll_at(model, batches, removal.removed + [block], positions)
        assert removal.measure(block) == pytest.approx(expected, rel=1e-6)
        assert blockwise.measure(block) == pytest.approx(expected, rel=1e-5)
        removal.remove(block), blockwise.remove(block)
    assert removal.measure(4) != pytest.approx(calibration_nll(model, batches, [3, 1, 4]), rel=1e-3)


def test_the_kl_objective_on_some_positions_is_the_kl_there(monkeypatch):
    import sglp_llm.selection.removal as removal_module
    from sglp_llm.passes.head import position_sample
    from tiny_models import VOCAB

    monkeypatch.setattr(removal_module, "KL_TOP_K", VOCAB)
    model, batches = tiny_model("llama", num_layers=5), _batches()
    total = count = 0.0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            scored = position_sample(13, 0.5, seed=7 + i)
            mask = batch["attention_mask"][:, 1:][:, scored].bool()
            p = torch.log_softmax(model(**batch).logits[:, :-1][:, scored][mask].double(), -1)
            with skip_blocks(model, [2]):
                q = torch.log_softmax(model(**batch).logits[:, :-1][:, scored][mask].double(), -1)
            total += (p.exp() * (p - q)).sum().item()
            count += mask.sum().item()
    measured = RemovalLoss(model, batches, objective="kl", position_share=0.5, seed=7).measure(2)
    assert measured == pytest.approx(total / count, rel=1e-4)


def test_blockwise_measure_many_reads_each_block_once_for_every_candidate():
    """One block-by-block pass for all candidates gives each one's `measure`, after removals that
    left some kept outputs stale, and reads each block it needs once (not once per candidate)."""
    from sglp_llm.model.handle import ModelHandle
    from sglp_llm.model.offload import InPlace
    from sglp_llm.selection.removal import BlockwiseRemovalLoss

    class CountingLoader(InPlace):
        def __init__(self):
            self.reads = []

        def onload(self, index, block, device):
            self.reads.append(index)

    model, batches = tiny_model("gemma3_text", num_layers=7), _batches()
    loader = CountingLoader()
    plain = RemovalLoss(model, batches)
    blockwise = BlockwiseRemovalLoss(ModelHandle.of(model).one_block_at_a_time("cpu", loader), batches)
    for block in (4, 2):
        plain.remove(block), blockwise.remove(block)
    blockwise.current()  # every kept output up to the last block
    blockwise.remove(5)  # outputs from block 5 on are stale
    plain.remove(5)
    loader.reads.clear()
    candidates = [1, 3, 6]
    many = blockwise.measure_many(candidates)
    assert many == pytest.approx({b: plain.measure(b) for b in candidates}, rel=1e-5)
    assert many == pytest.approx({b: calibration_nll(model, batches, [4, 2, 5, b]) for b in candidates}, rel=1e-5)
    # kept outputs of blocks 0, 1, 3 start the streams; candidate 1's runs blocks 3 and 6, 3's
    # runs 6, 6's none: one read of each (one at a time: 3, 6, 6)
    assert sorted(loader.reads) == [3, 6]
    with pytest.raises(ValueError, match=r"Blocks \[2\] are removed already"):
        blockwise.measure_many([2, 3])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_increase_error_is_the_standard_error_of_each_sequences_increase(family):
    """Against each sequence's loss from a whole-network pass over it alone (the padded ones
    too), after a removal, block by block and measured several at once alike."""
    from sglp_llm.selection.removal import BlockwiseRemovalLoss

    model, batches = tiny_model(family, num_layers=7), _batches()
    rows = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(3)]

    def expected(removed, block):
        increase = torch.tensor([calibration_nll(model, [r], removed + [block]) - calibration_nll(model, [r], removed) for r in rows])
        return (increase.std() / len(rows) ** 0.5).item()

    plain, blockwise = RemovalLoss(model, batches), BlockwiseRemovalLoss(model, batches)
    plain.remove(4), blockwise.remove(4)
    plain.measure(2), blockwise.measure_many([2, 5])
    for removal in (plain, blockwise):  # the current network's own losses measured when first needed
        assert removal.increase_error(2) == pytest.approx(expected([4], 2), rel=1e-5)
    assert blockwise.increase_error(5) == pytest.approx(expected([4], 5), rel=1e-5)
    with pytest.raises(ValueError, match="NLL objective only"):
        RemovalLoss(model, batches, objective="kl").increase_error(2)
