"""Streaming minibatch CKA against a direct full-batch implementation of the same estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.passes.capture import capture_blocks
from sglp_llm.statistics.cka import MinibatchCKA
from tiny_models import tiny_batch, tiny_model


def reference_unbiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC for linear kernels, written out term by term."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ k @ l @ one)
    ) / (n * (n - 3))


def reference_cka(features: list[np.ndarray]) -> np.ndarray:
    hsic = np.array([[reference_unbiased_hsic(a, b) for b in features] for a in features])
    return hsic / np.sqrt(np.outer(np.diag(hsic), np.diag(hsic)))


def _layers(n_tokens: int, hidden: int = 16, count: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tokens, hidden, generator=g, dtype=torch.float64)
    out, x = [], base
    for _ in range(count):
        x = torch.tanh(x @ torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / 4) + 0.5 * x
        out.append(x.clone())
    return out


def _run(layers: list[torch.Tensor], mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Feed [batch, seq, hidden] layers (flattened rows laid out in `mask`'s shape) once."""
    acc = MinibatchCKA(len(layers), **kwargs)
    acc.start_batch(mask)
    for i, x in enumerate(layers):
        acc.add(i, x.reshape(*mask.shape, -1))
    acc.finish_batch()
    return acc.compute()


def test_one_minibatch_equals_full_batch_reference():
    layers = _layers(48)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[3, 8:] = False  # padding: these rows must be ignored
    cka = _run(layers, mask, minibatch_tokens=1000)
    valid = mask.reshape(-1).numpy()
    expected = reference_cka([x.numpy()[valid] for x in layers])
    np.testing.assert_allclose(cka.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, 1.0), "layers are too alike for the test to mean anything"


def test_float32_accumulation_matches_reference():
    layers = [x.float() for x in _layers(40)]
    mask = torch.ones(2, 20, dtype=torch.bool)
    cka = _run(layers, mask, minibatch_tokens=1000, dtype=torch.float32)
    assert cka.dtype == torch.float32
    expected = reference_cka([x.double().numpy() for x in layers])
    np.testing.assert_allclose(cka.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_self_similarity_is_one_and_matrix_symmetric():
    layers = _layers(64)
    cka = _run(layers, torch.ones(4, 16, dtype=torch.bool), minibatch_tokens=16)
    np.testing.assert_allclose(cka.diagonal().numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(cka.numpy(), cka.T.numpy(), atol=1e-12)


def test_invariant_to_isotropic_scaling_and_orthogonal_transforms():
    a, b = _layers(60, count=2)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    mask = torch.ones(3, 20, dtype=torch.bool)
    cka = _run([a, b, 7.5 * a, b @ q, 0.01 * (a @ q)], mask, minibatch_tokens=20, seed=1)
    assert cka[0, 1] < 0.99
    np.testing.assert_allclose(cka[0, 2].item(), 1.0, atol=1e-10)
    np.testing.assert_allclose(cka[1, 3].item(), 1.0, atol=1e-10)
    np.testing.assert_allclose(cka[0, 4].item(), 1.0, atol=1e-10)
    np.testing.assert_allclose(cka[2, 3].item(), cka[0, 1].item(), atol=1e-10)


def test_minibatch_estimate_is_the_mean_of_per_minibatch_hsic():
    """With minibatches of m tokens, CKA = mean HSIC / sqrt(mean HSIC · mean HSIC)."""
    layers = _layers(60)
    acc = MinibatchCKA(len(layers), minibatch_tokens=20, seed=5)
    mask = torch.ones(3, 20, dtype=torch.bool)
    acc.start_batch(mask)
    chunks = [c.clone() for c in acc._chunks]
    positions = acc._positions.clone()
    for i, x in enumerate(layers):
        acc.add(i, x.reshape(3, 20, -1))
    acc.finish_batch()
    assert len(chunks) == 3 and sorted(torch.cat(chunks).tolist()) == list(range(60))
    hsic = np.zeros((len(layers), len(layers)))
    for chunk in chunks:
        rows = positions[chunk].numpy()
        feats = [x.numpy()[rows] for x in layers]
        hsic += np.array([[reference_unbiased_hsic(a, b) for b in feats] for a in feats])
    hsic /= len(chunks)
    expected = hsic / np.sqrt(np.outer(np.diag(hsic), np.diag(hsic)))
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=1e-9)


def _tensor_bytes(acc: MinibatchCKA) -> int:
    total = 0
    for value in vars(acc).values():
        values = value if isinstance(value, list) else [value]
        total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return total


def test_memory_does_not_grow_with_tokens():
    layers = _layers(32)
    acc = MinibatchCKA(len(layers), minibatch_tokens=8)
    sizes = []
    for _ in range(20):
        acc.start_batch(torch.ones(2, 16, dtype=torch.bool))
        for i, x in enumerate(layers):
            acc.add(i, x.reshape(2, 16, -1))
        acc.finish_batch()
        sizes.append(_tensor_bytes(acc))
    assert acc.n_tokens == 20 * 32 and acc.n_minibatches == 20 * 4
    assert len(set(sizes)) == 1
    assert sizes[0] == len(layers) ** 2 * 8


def test_token_subsampling_caps_tokens_per_batch():
    layers = _layers(64)
    acc = MinibatchCKA(len(layers), minibatch_tokens=8, max_tokens_per_batch=24)
    acc.start_batch(torch.ones(4, 16, dtype=torch.bool))
    for i, x in enumerate(layers):
        acc.add(i, x.reshape(4, 16, -1))
    acc.finish_batch()
    assert acc.n_tokens == 24 and acc.n_minibatches == 3


def test_same_seed_same_result_other_seed_differs():
    layers = _layers(64)
    mask = torch.ones(4, 16, dtype=torch.bool)
    a = _run(layers, mask, minibatch_tokens=8, seed=0)
    b = _run(layers, mask, minibatch_tokens=8, seed=0)
    c = _run(layers, mask, minibatch_tokens=8, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_nan_activations_raise_with_advice():
    acc = MinibatchCKA(1, minibatch_tokens=8)
    acc.start_batch(torch.ones(1, 8, dtype=torch.bool))
    x = torch.randn(1, 8, 4)
    x[0, 3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="Block 0 produced NaN.*--dtype"):
        acc.add(0, x)


def test_no_tokens_is_an_error():
    acc = MinibatchCKA(2)
    with pytest.raises(ValueError, match="empty or all padding"):
        acc.compute()


def test_resume_from_state_dict_equals_uninterrupted():
    layers = _layers(32)
    mask = torch.ones(2, 16, dtype=torch.bool)

    def feed(acc):
        acc.start_batch(mask)
        for i, x in enumerate(layers):
            acc.add(i, x.reshape(2, 16, -1))
        acc.finish_batch()

    full = MinibatchCKA(len(layers), minibatch_tokens=8)
    for _ in range(4):
        feed(full)
    first = MinibatchCKA(len(layers), minibatch_tokens=8)
    for _ in range(2):
        feed(first)
    resumed = MinibatchCKA(len(layers), minibatch_tokens=8)
    resumed.load_state_dict(first.state_dict())
    for _ in range(2):
        feed(resumed)
    assert torch.equal(resumed.compute(), full.compute())


def test_hooked_model_equals_reference_on_captured_block_outputs():
    model = tiny_model("llama", num_layers=6)
    batch = tiny_batch(batch_size=3, seq_len=10, pad_last=4)
    layers = find_decoder_blocks(model).layers
    outputs: dict[int, torch.Tensor] = {}
    acc = MinibatchCKA(len(layers), minibatch_tokens=1000)
    mask = batch["attention_mask"].bool()

    def callback(i, _inp, out):
        outputs[i] = out.detach().clone()
        acc.add(i, out)

    with torch.no_grad(), capture_blocks(layers, callback):
        acc.start_batch(mask)
        model(**batch)
        acc.finish_batch()
    assert all(not layer._forward_hooks for layer in layers), "hooks must be removed"
    expected = reference_cka([outputs[i][mask].double().numpy() for i in range(len(layers))])
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_hooks_removed_on_error():
    model = tiny_model("llama", num_layers=3)
    layers = find_decoder_blocks(model).layers

    def boom(i, _inp, _out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with capture_blocks(layers, boom):
            model(**tiny_batch())
    assert all(not layer._forward_hooks for layer in layers)


def test_skip_sinks_leaves_out_exactly_the_first_tokens_and_massive_activations():
    """Each sequence's first token (after left padding) and any token whose norm at some layer
    is over SINK_NORM_RATIO x the minibatch median there are left out; the sums then equal the
    HSIC of the remaining tokens computed directly (one minibatch: HSIC ignores token order)."""
    from sglp_llm.statistics.cka import SINK_NORM_RATIO, MinibatchCKA, cka_from_hsic, unbiased_hsic_matrix

    generator = torch.Generator().manual_seed(0)
    batch, seq, dim, layers = 2, 12, 8, 3
    hidden = [torch.randn(batch, seq, dim, generator=generator, dtype=torch.float64) for _ in range(layers)]
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, :2] = False  # left padding: row 1 starts at position 2
    hidden[1][0, 5] *= 3 * SINK_NORM_RATIO  # a massive activation at layer 1 only
    hidden[2][1, 7] *= 3 * SINK_NORM_RATIO  # and one at layer 2
    hidden[0][0, 9] *= 0.5 * SINK_NORM_RATIO / 3  # large, but not over the ratio: kept
    cka = MinibatchCKA(layers, minibatch_tokens=1000, skip_sinks=True)
    cka.start_batch(mask)
    for i, h in enumerate(hidden):
        cka.add(i, h)
    cka.finish_batch()
    left_out = {(0, 0), (1, 2), (0, 5), (1, 7)}
    keep = [(b, t) for b in range(batch) for t in range(seq) if mask[b, t] and (b, t) not in left_out]
    assert cka.n_sinks == 4 and cka.n_tokens == len(keep) == 18
    grams = torch.stack([torch.stack([h[b, t] for b, t in keep]) @ torch.stack([h[b, t] for b, t in keep]).T for h in hidden])
    torch.testing.assert_close(cka.hsic_sum, unbiased_hsic_matrix(grams))
    torch.testing.assert_close(cka.compute(), cka_from_hsic(unbiased_hsic_matrix(grams)))
    plain = MinibatchCKA(layers, minibatch_tokens=1000)
    plain.start_batch(mask)
    for i, h in enumerate(hidden):
        plain.add(i, h)
    plain.finish_batch()
    assert plain.n_tokens == 22 and plain.n_sinks == 0
    assert not torch.allclose(plain.hsic_sum, cka.hsic_sum)
