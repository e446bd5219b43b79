"""Compensation folded into the kept weights: the fitted T is the least-squares solution on the
stacked activations, the fold computes exactly what an explicit T on the MLP output computes, and
families that normalise the MLP output first are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from sglp_llm import ConfigError
from sglp_llm.blocks import find_decoder_blocks
from sglp_llm.compensate import applied, fit_compensation, fold, removed_runs
from sglp_llm.rewrite import skip_blocks
from tiny_models import tiny_batch, tiny_model


def _batches(n=3):
    return [tiny_batch(batch_size=4, seq_len=16, seed=s, pad_last=3 if s == 0 else 0) for s in range(n)]


def test_removed_runs_are_the_contiguous_runs():
    assert removed_runs([5, 2, 3, 9, 8, 12]) == [(2, 3), (5, 5), (8, 9), (12, 12)]
    assert removed_runs([]) == []


def _stacked(model, batches, p, b):
    """M (block p's MLP output) and h_b − Y, every non-padding token but each row's first."""
    return _stacked_branch(model, batches, p, b, find_decoder_blocks(model).layers[p].mlp)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fitted_transform_is_the_least_squares_solution(family):
    model = tiny_model(family, num_layers=8)
    batches = _batches()
    compensation = fit_compensation(model, batches, [3, 4, 6])
    assert sorted(compensation.transforms) == [2, 5]
    for p, b in ((2, 4), (5, 6)):
        m, z = _stacked(model, batches, p, b)
        reference = torch.linalg.lstsq(m, z).solution
        torch.testing.assert_close(compensation.transforms[p], reference, rtol=1e-6, atol=1e-8)
        fit = compensation.fits[p]
        assert fit["run"] == [p + 1, b] and fit["tokens"] == len(m)
        assert fit["relative_residual"] == pytest.approx(float(((m @ reference - z) ** 2).sum() / (z * z).sum()), rel=1e-6)
        assert fit["relative_residual"] < fit["relative_residual_dropped"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_fold_equals_the_explicit_transform_on_the_mlp_output(family):
    model = tiny_model(family, num_layers=8)
    dropped = [3, 4, 6]
    compensation = fit_compensation(model, _batches(), dropped)
    batch = tiny_batch(batch_size=2, seq_len=12, seed=9, pad_last=2)
    with torch.no_grad(), applied(model, compensation), skip_blocks(model, dropped):
        expected = model(**batch).logits
    folded = copy.deepcopy(model)
    fold(folded, compensation)
    with torch.no_grad(), skip_blocks(folded, dropped):
        got = folded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), skip_blocks(model, dropped):  # and it is not the plain drop
        assert not torch.allclose(model(**batch).logits, expected, atol=1e-3)


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_families_that_normalise_the_mlp_output_are_refused(family):
    model = tiny_model(family, num_layers=6)
    with pytest.raises(ConfigError, match="added to the residual stream as it is"):
        fit_compensation(model, _batches(1), [2, 3])


def test_a_run_from_the_first_block_is_refused():
    with pytest.raises(ConfigError, match="block 0 has none before it"):
        fit_compensation(tiny_model("llama", num_layers=4), _batches(1), [0, 1])


def test_prune_with_compensation_writes_a_plain_model_equal_to_the_explicit_transform(tmp_path):
    from transformers import AutoModelForCausalLM

    from sglp_llm import SGLPConfig, prune
    from sglp_llm.explain import stages

    model = tiny_model("llama", num_layers=8)
    original = copy.deepcopy(model)
    config = SGLPConfig(drop=3, compensation="least_squares", cka_minibatch_tokens=16, seq_len=16, n_samples=12,
                        batch_size=4)
    result = prune(model, _batches(), config, progress=False)
    folded = result.plan.extra["compensation"]["folded"]
    runs = removed_runs(result.plan.dropped)
    assert sorted(int(p) for p in folded) == [a - 1 for a, _ in runs]
    assert all(0 <= f["relative_residual"] < f["relative_residual_dropped"] for f in folded.values())
    assert stages(result.plan.config)[-1].startswith("compensation: a d x d map T")
    saved = result.save_pretrained(tmp_path / "out")  # verified: in memory and reloaded
    assert result.plan.extra["verification"]["checks"]
    card = (saved / "README.md").read_text()
    for p, f in folded.items():
        assert f"compensation folded into block {p} (before removed blocks {f['run'][0]}-{f['run'][1]})" in card
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    refit = fit_compensation(original, _batches(), result.plan.dropped)
    batch = tiny_batch(batch_size=2, seq_len=12, seed=7)
    with torch.no_grad(), applied(original, refit), skip_blocks(original, result.plan.dropped):
        expected = original(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_prune_refuses_compensation_where_it_cannot_fold_and_leaves_the_model_unchanged():
    from sglp_llm import SGLPConfig, prune

    model = tiny_model("gemma2", num_layers=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="added to the residual stream as it is"):
        prune(model, _batches(1), SGLPConfig(drop=2, compensation="least_squares", cka_minibatch_tokens=16),
              progress=False)
    assert len(find_decoder_blocks(model).layers) == 6
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="offload: sequential"):
        SGLPConfig(drop=1, compensation="least_squares", offload="sequential")


def _stacked_branch(model, batches, p, b, module):
    """`module`'s output (block p's branch) and h_b − Y, every non-padding token but each row's first."""
    layers = find_decoder_blocks(model).layers
    ms, zs, seen = [], [], {}
    handles = [module.register_forward_hook(lambda m, a, o: seen.__setitem__("m", o)),
               layers[p].register_forward_hook(lambda m, a, o: seen.__setitem__("p", o[0] if isinstance(o, tuple) else o)),
               layers[b].register_forward_hook(lambda m, a, o: seen.__setitem__("b", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            mask = batch["attention_mask"].bool().clone()
            mask[:, 0] = False
            ms.append(seen["m"][mask])
            zs.append((seen["b"] - (seen["p"] - seen["m"]))[mask])
    for handle in handles:
        handle.remove()
    return torch.cat(ms).double(), torch.cat(zs).double()


# llama: the scale folds into the down projection; gemma2/gemma3 (weight offset 1) and olmo2
# (offset 0): into the post-feedforward norm
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "olmo2"])
def test_rescale_is_each_channels_least_squares_scale_and_folds_exactly(family):
    model = tiny_model(family, num_layers=8)
    batches = _batches()
    dropped = [3, 4, 6]
    compensation = fit_compensation(model, batches, dropped, method="rescale")
    layers = find_decoder_blocks(model).layers
    for p, b in ((2, 4), (5, 6)):
        module = getattr(layers[p], "post_feedforward_layernorm", None) or layers[p].mlp
        m, z = _stacked_branch(model, batches, p, b, module)
        reference = (m * z).sum(0) / (m * m).sum(0)
        torch.testing.assert_close(compensation.transforms[p], torch.diag(reference), rtol=1e-6, atol=1e-9)
        assert compensation.fits[p]["relative_residual"] <= compensation.fits[p]["relative_residual_dropped"]
    batch = tiny_batch(batch_size=2, seq_len=12, seed=9, pad_last=2)
    with torch.no_grad(), applied(model, compensation), skip_blocks(model, dropped):
        expected = model(**batch).logits
    folded = copy.deepcopy(model)
    unfold = fold(folded, compensation)
    with torch.no_grad(), skip_blocks(folded, dropped):
        torch.testing.assert_close(folded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    unfold()
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(), model.state_dict().values()))
