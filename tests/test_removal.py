"""RemovalLoss against the whole-network loss (calibration_nll) and a loss written out by hand."""

import pytest
import torch

from sglp_llm.removal import RemovalLoss, calibration_nll
from sglp_llm.rewrite import skip_blocks
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
