"""GradNorm scores against norms read off a plain `loss.backward()`."""

from __future__ import annotations

import math

import torch

from sglp_llm.blocks import find_decoder_blocks
from sglp_llm.score import BlockGradNorms, causal_lm_loss, grad_only_for, network_gradnorm
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
