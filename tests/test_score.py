"""GradNorm scores against norms read off a plain `loss.backward()`."""

from __future__ import annotations

import math

import torch

from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.statistics.score import BlockGradNorms, network_gradnorm
from sglp_llm.passes.loss import causal_lm_loss, grad_only_for
from tiny_models import tiny_batch, tiny_model


def plain_block_norms(model, batch) -> list[float]:
    """Reference: ordinary full backward, then read every block's parameter gradients."""
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    norms = [
        math.sqrt(sum(float(p.grad.pow(2).sum()) for p in block.parameters() if p.grad is not None))
        for block in find_decoder_blocks(model).layers
    ]
    model.zero_grad(set_to_none=True)
    return norms


def test_block_gradnorm_equals_plain_backward():
    model = tiny_model("qwen2")
    batch = tiny_batch(batch_size=3, seq_len=10, pad_last=3)
    expected = plain_block_norms(model, batch)
    scorer = BlockGradNorms.for_blocks(find_decoder_blocks(model).layers)
    with grad_only_for(model, scorer.parameters()), scorer.hooks():
        causal_lm_loss(model, batch).backward()
        scorer.end_batch()
    torch.testing.assert_close(scorer.compute(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert len(set(round(x, 6) for x in expected)) == len(expected)


def test_scores_over_batches_are_root_mean_square_and_grads_are_freed():
    model = tiny_model("llama")
    batches = [tiny_batch(seed=s) for s in range(3)]
    expected = torch.tensor([plain_block_norms(model, b) for b in batches], dtype=torch.float64)
    scorer = BlockGradNorms.for_blocks(find_decoder_blocks(model).layers)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with grad_only_for(model, scorer.parameters()), scorer.hooks():
        for batch in batches:
            causal_lm_loss(model, batch).backward()
            # folded as soon as accumulated: no block gradient is left after each backward
            assert all(p.grad is None for p in scorer.parameters())
            scorer.end_batch()
    torch.testing.assert_close(scorer.compute(), expected.pow(2).mean(0).sqrt(), rtol=1e-5, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters() if p._post_accumulate_grad_hooks is not None)


def test_network_gradnorm_equals_norm_over_all_parameters():
    model = tiny_model("gemma3_text")
    batch = tiny_batch()
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    assert math.isclose(network_gradnorm(model, [batch]), expected, rel_tol=1e-5)


def _gated(model, index: int, alpha: torch.Tensor):
    """Block `index` computes h + alpha * (block(h) - h): the explicit gate of the gate scores."""
    from sglp_llm.passes.capture import block_input, block_output

    def hook(module, args, kwargs, output):
        hidden = block_input(args, kwargs)
        gated = hidden + alpha * (block_output(output) - hidden)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated

    return find_decoder_blocks(model).layers[index].register_forward_hook(hook, with_kwargs=True)


def _sequence_losses(model, batch) -> torch.Tensor:
    """Each sequence's mean next-token loss over its own predicted tokens."""
    logits = model(**batch, use_cache=False).logits[:, :-1].double()
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(1) / mask.sum(1)


def gate_reference(model, batches) -> dict[str, torch.Tensor]:
    """taylor = -d(mean token loss over all batches)/dα and fisher = mean over sequences of
    (d sequence loss/dα)², by autograd on an explicit gate α = 1 on each block in turn."""
    num_blocks = len(find_decoder_blocks(model).layers)
    taylor, fisher = [], []
    for index in range(num_blocks):
        alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
        handle = _gated(model, index, alpha)
        try:
            derivatives, weights = [], []
            for batch in batches:
                losses = _sequence_losses(model, batch)
                for loss in losses:
                    derivatives.append(torch.autograd.grad(loss, alpha, retain_graph=True)[0])
                weights += batch["attention_mask"][:, 1:].sum(1).tolist()
        finally:
            handle.remove()
        d = torch.stack(derivatives)
        w = torch.tensor(weights, dtype=torch.float64)
        taylor.append(-(d * w).sum() / w.sum())
        fisher.append(d.pow(2).mean())
    return {"taylor": torch.stack(taylor).detach(), "fisher": torch.stack(fisher).detach()}


def gate_scores_of(model, batches) -> dict[str, torch.Tensor]:
    from sglp_llm.statistics.score import GateScores

    layers = find_decoder_blocks(model).layers
    gates = GateScores(len(layers))
    with grad_only_for(model, ()), gates.hooks(layers):
        for batch in batches:
            gates.start_batch(batch["attention_mask"].bool())
            causal_lm_loss(model, batch).backward()
    return gates.compute()


def test_gate_scores_equal_autograd_on_an_explicit_gate_with_no_weight_gradient():
    model = tiny_model("llama", num_layers=5)
    # padded sequences and batches of different sizes: the scores are exact per sequence
    batches = [tiny_batch(batch_size=3, seq_len=12, seed=0, pad_last=4), tiny_batch(batch_size=2, seq_len=12, seed=1)]
    expected = gate_reference(model, batches)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = gate_scores_of(model, batches)
    for name in ("taylor", "fisher"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-9)
    assert len(set(got["taylor"].sign().tolist())) > 0 and got["fisher"].min() > 0
    # no weight gradient was made, and the flags are restored
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # the same sequences batched otherwise give the same scores
    regrouped = [tiny_batch(batch_size=3, seq_len=12, seed=0, pad_last=4)]
    one_by_one = [{k: v[i : i + 1] for k, v in regrouped[0].items()} for i in range(3)]
    torch.testing.assert_close(gate_scores_of(model, one_by_one)["fisher"], gate_scores_of(model, regrouped)["fisher"], rtol=1e-4, atol=1e-9)


def test_taylor_score_is_the_finite_difference_of_the_loss_in_the_gate():
    # float64, but the RMS norms still compute in float32: a step large enough to rise above that
    model = tiny_model("gemma3_text", num_layers=4).double()
    batch = tiny_batch(batch_size=2, seq_len=10, seed=3)
    got = gate_scores_of(model, [batch])["taylor"]
    eps = 1e-2
    for index in range(4):
        losses = []
        for a in (1 + eps, 1 - eps):
            handle = _gated(model, index, torch.tensor(a, dtype=torch.float64))
            with torch.no_grad():  # the batch's mean token loss, in float64 (HF's loss is float32)
                losses.append(float(_sequence_losses(model, batch).mean()))
            handle.remove()
        assert math.isclose(-(losses[0] - losses[1]) / (2 * eps), float(got[index]), rel_tol=2e-3, abs_tol=1e-6)


def test_gate_scores_under_activation_checkpointing_count_each_block_once():
    from sglp_llm.passes.loss import activation_checkpointing

    model = tiny_model("qwen2", num_layers=4)
    batches = [tiny_batch(batch_size=2, seq_len=12, seed=5, pad_last=2)]
    plain = gate_scores_of(model, batches)
    with activation_checkpointing(model):
        checkpointed = gate_scores_of(model, batches)
    for name in ("taylor", "fisher"):
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-9)
