"""The loss from a final hidden state in chunks of positions equals the model's own loss, and no
chunk's float32 logits exceed the stated budget."""

from __future__ import annotations

import pytest
import torch

from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.passes.head import backward_through_head, chunk_positions, head_nll, output_of
from sglp_llm.selection.removal import network_nll
from sglp_llm.passes.loss import causal_lm_loss, token_nll
from tiny_models import VOCAB, tiny_batch, tiny_model

# gemma2: the head applies logit softcapping, which the chunks must keep
FAMILIES = ("llama", "gemma2", "qwen3")


def _final(model, batch):
    layers = find_decoder_blocks(model).layers
    with torch.no_grad():
        final, arity = output_of(model, layers[-1], batch)
    return layers, final, arity


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_the_models_own_loss_and_keeps_chunks_within_the_budget(family):
    model = tiny_model(family, num_layers=3, **({"final_logit_softcapping": 2.0} if family == "gemma2" else {}))
    batch = tiny_batch(batch_size=3, seq_len=17, pad_last=5)
    with torch.no_grad():
        full = causal_lm_loss(model, batch).item()
    layers, final, arity = _final(model, batch)
    budget = 3 * 4 * VOCAB * 4  # four positions of the batch in float32
    assert chunk_positions(model, 3, budget) == 4
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            total, count = head_nll(model, batch, final, arity, max_logits_bytes=budget)
    finally:
        handle.remove()
    assert count == 3 * 16 - 5
    assert total.item() / count == pytest.approx(full, rel=1e-6)  # float32 sums in another order
    # 16 predicting positions in chunks of 4; none holds more logits than the budget
    assert shapes == [(3, 4, VOCAB)] * 4
    # the whole-network helper gives the same number with the default budget (one chunk here)
    nll, n = network_nll(model, batch)
    assert n == count and abs(nll / n - full) <= 1e-6


def test_chunked_backward_gives_the_gradient_of_the_full_loss():
    model = tiny_model("gemma2", num_layers=2, final_logit_softcapping=2.0)
    batch = tiny_batch(batch_size=2, seq_len=13, pad_last=3)
    layers, final, arity = _final(model, batch)
    reference = final.detach().clone().requires_grad_()
    total, count = head_nll(model, batch, reference, arity)
    (total / count).backward()
    chunked = final.detach().clone().requires_grad_()
    summed, same_count = head_nll(model, batch, chunked, arity, max_logits_bytes=2 * 3 * VOCAB * 4,
                                  backward=True)
    assert same_count == count and not summed.requires_grad
    torch.testing.assert_close(chunked.grad, reference.grad, rtol=1e-5, atol=1e-7)
    assert abs(summed.item() - total.item()) <= 1e-5


def test_backward_through_the_chunked_head_equals_the_full_loss_backward(monkeypatch):
    """The statistics pass's backward: the same weight gradients as `loss.backward()`, with the
    head's logits a few positions at a time."""
    import sglp_llm.passes.head as head

    model = tiny_model("gemma2", num_layers=3, final_logit_softcapping=2.0)
    batch = tiny_batch(batch_size=2, seq_len=11, pad_last=2)
    layers = find_decoder_blocks(model).layers
    causal_lm_loss(model, batch).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(head, "MAX_LOGITS_BYTES", 2 * 3 * VOCAB * 4)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    final, arity = output_of(model, layers[-1], batch)
    loss = backward_through_head(model, batch, final, arity)
    handle.remove()
    assert shapes == [(2, 3, VOCAB)] * 3 + [(2, 1, VOCAB)]  # 10 predicting positions, 3 at a time
    with torch.no_grad():
        assert abs(loss.item() - causal_lm_loss(model, batch).item()) <= 1e-6
    # the head's own weights are reached through the leaf only: compare the blocks' gradients
    for name, grad in reference.items():
        if name.startswith("model.layers."):
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vocabulary_subset_scores_its_tokens_as_a_brute_force_over_the_full_logits(family):
    """The NLL over a subset equals the formula on the model's own full logits (softcapping and
    all): per sequence, logsumexp over its kept tokens (its likeliest and its next tokens) and the
    sample's others, each of those weighted by |rest| / |sample outside its kept|, minus the
    target's logit; with the whole vocabulary sampled, the exact NLL; and a sequence's number does
    not depend on the batch it is in."""
    from sglp_llm.passes.head import likeliest_tokens, vocabulary_subset

    model = tiny_model(family, num_layers=3, **({"final_logit_softcapping": 2.0} if family == "gemma2" else {}))
    batch = tiny_batch(batch_size=3, seq_len=17, pad_last=5)
    layers, final, arity = _final(model, batch)
    targets, valid = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
        top = likeliest_tokens(model, batch, final, arity, 3)
        assert [t.shape for t in top] == [(16, 3), (16, 3), (11, 3)]
        assert all(torch.equal(t, logits[r].topk(3, dim=-1).indices[valid[r]]) for r, t in enumerate(top))
        for sampled in (7, VOCAB):
            subset = vocabulary_subset(top, targets, VOCAB, sampled, seed=1)
            total, counts = head_nll(model, batch, final, arity, per_sequence=True, vocabulary=subset,
                                     max_logits_bytes=3 * 4 * VOCAB * 4)
            drawn = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:sampled]
            for r in range(3):
                kept = torch.cat([top[r].flatten(), targets[r]]).unique()
                others = drawn[~torch.isin(drawn, kept)]
                weight = torch.log(torch.tensor((VOCAB - len(kept)) / max(len(others), 1)))
                lse = torch.logsumexp(torch.cat([logits[r][:, kept], logits[r][:, others] + weight], dim=-1), dim=-1)
                brute = lse - logits[r].gather(-1, targets[r][:, None])[:, 0]
                assert torch.allclose(total[r], brute[valid[r]].sum(), atol=1e-4)
            alone = vocabulary_subset(top[2:], targets[2:], VOCAB, sampled, seed=1)
            row = {k: v[2:] for k, v in batch.items()}
            assert torch.allclose(head_nll(model, row, final[2:], arity, per_sequence=True, vocabulary=alone)[0], total[2:], atol=1e-4)
        exact, _ = head_nll(model, batch, final, arity, per_sequence=True)
        assert torch.allclose(total, exact, atol=1e-4)  # every token sampled: nothing estimated


def test_a_head_that_is_not_a_linear_layer_is_refused():
    from sglp_llm.config import ConfigError
    from sglp_llm.passes.head import vocabulary_subset

    model = tiny_model("llama", num_layers=2)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    batch = tiny_batch(batch_size=1, seq_len=8)
    layers, final, arity = _final(model, batch)
    subset = vocabulary_subset([torch.tensor([4])], batch["input_ids"][:, 1:], VOCAB, 2, seed=0)
    with pytest.raises(ConfigError, match="not a linear layer: it cannot be narrowed .* Set loss_vocabulary to 0"):
        head_nll(model, batch, final, arity, vocabulary=subset)


def test_a_vocabulary_chosen_for_the_model_narrows_only_a_large_plain_linear_head_for_the_nll():
    """loss_vocabulary None: 32 likeliest tokens where a subset is much smaller than the
    vocabulary and the head can be cut; the whole vocabulary for a small one, the KL objective, a
    head that is no linear layer or one an accelerate hook places (it could swap weights back);
    a set value as set."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from sglp_llm.config import AUTO_VOCABULARY, NARROWED_FROM, ConfigError, SGLPConfig
    from sglp_llm.passes.head import loss_vocabulary, vocabulary_subset

    unset = SGLPConfig(drop=1, loss_vocabulary=None)
    large = tiny_model("llama", num_layers=1, vocab_size=NARROWED_FROM)
    assert loss_vocabulary(large, unset) == AUTO_VOCABULARY == 32
    assert loss_vocabulary(large, unset, "kl") == loss_vocabulary(large, unset.replace(loss_objective="kl")) == 0
    assert loss_vocabulary(large, unset.replace(loss_vocabulary=0)) == 0
    assert loss_vocabulary(tiny_model("llama", num_layers=1), unset.replace(loss_vocabulary=5)) == 5
    assert loss_vocabulary(tiny_model("llama", num_layers=1, vocab_size=NARROWED_FROM - 1), unset) == 0
    wrapped = tiny_model("llama", num_layers=1, vocab_size=NARROWED_FROM)
    wrapped.lm_head = torch.nn.Sequential(wrapped.lm_head)
    assert loss_vocabulary(wrapped, unset) == 0
    add_hook_to_module(large.lm_head, AlignDevicesHook(execution_device="cpu"))
    assert loss_vocabulary(large, unset) == 0
    batch = tiny_batch(batch_size=1, seq_len=8)
    layers, final, arity = _final(large, batch)
    subset = vocabulary_subset([torch.tensor([4])], batch["input_ids"][:, 1:], NARROWED_FROM, 2, seed=0)
    with pytest.raises(ConfigError, match="placed by an accelerate device map .* Set loss_vocabulary to 0"):
        head_nll(large, batch, final, arity, vocabulary=subset)


def test_token_nll_matches_a_float64_reference_on_a_large_vocabulary_and_carries_gradients():
    # the head's NLL over 262k tokens (Gemma-3's vocabulary): float32 logsumexp within 1e-5 of float64
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 262_144, generator=generator) * 4).requires_grad_()
    targets = torch.randint(0, 262_144, (2, 3), generator=generator)
    reference = torch.logsumexp(logits.double(), -1) - logits.double().gather(-1, targets[..., None])[..., 0]
    nll = token_nll(logits, targets)
    assert nll.shape == (2, 3)
    assert torch.allclose(nll.double(), reference, atol=1e-5, rtol=0)
    nll.sum().backward()  # softmax minus the target's one-hot
    expected = logits.detach().softmax(-1) - torch.nn.functional.one_hot(targets, 262_144)
    assert torch.allclose(logits.grad, expected, atol=2e-5)
