"""Compensation folded into the kept weights: the fitted T is the least-squares solution on the
stacked activations, the fold computes exactly what an explicit T on the MLP output computes, and
families that normalise the MLP output first are refused."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from sglp_llm import ConfigError
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.recovery.compensate import Compensation, applied, fit_compensation, fold, removed_runs
from sglp_llm.model.rewrite import skip_blocks
from tiny_models import tiny_batch, tiny_model


def _batches(n=3):
    return [tiny_batch(batch_size=4, seq_len=16, seed=s, pad_last=3 if s == 0 else 0) for s in range(n)]


def test_removed_runs_are_the_contiguous_runs():
    assert removed_runs([5, 2, 3, 9, 8, 12]) == [(2, 3), (5, 5), (8, 9), (12, 12)]
    assert removed_runs([]) == []


def _stacked(model, batches, p, b, skip_first=False):
    """M (block p's MLP output) and h_b − Y, every non-padding token (but each row's first)."""
    return _stacked_branch(model, batches, p, b, find_decoder_blocks(model).layers[p].mlp, skip_first)


@pytest.mark.parametrize("family, skip_first", [("llama", False), ("qwen3", False), ("llama", True)])
def test_fitted_transform_is_the_least_squares_solution(family, skip_first):
    model = tiny_model(family, num_layers=8)
    batches = _batches()
    compensation = fit_compensation(model, batches, [3, 4, 6], skip_first=skip_first)
    assert sorted(compensation.transforms) == [2, 5]
    for p, b in ((2, 4), (5, 6)):
        m, z = _stacked(model, batches, p, b, skip_first)
        reference = torch.linalg.lstsq(m, z).solution
        torch.testing.assert_close(compensation.transforms[p], reference, rtol=1e-6, atol=1e-8)
        fit = compensation.fits[p]
        assert fit["run"] == [p + 1, b] and fit["tokens"] == len(m)
        assert fit["relative_residual"] == pytest.approx(float(((m @ reference - z) ** 2).sum() / (z * z).sum()), rel=1e-6)
        assert fit["relative_residual"] < fit["relative_residual_dropped"]


@pytest.mark.parametrize("family, method", [("llama", "least_squares"), ("mistral", "least_squares"),
                                            ("qwen3", "least_squares"), ("llama", "cosine")])
def test_fold_equals_the_explicit_transform_on_the_mlp_output(family, method):
    model = tiny_model(family, num_layers=8)
    dropped = [3, 4, 6]
    compensation = fit_compensation(model, _batches(), dropped, method=method, cosine_steps=20)
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


@pytest.mark.parametrize("method", ["least_squares", "cosine"])
def test_prune_with_compensation_writes_a_plain_model_equal_to_the_explicit_transform(tmp_path, method):
    from transformers import AutoModelForCausalLM

    from sglp_llm import SGLPConfig, prune
    from sglp_llm.explain import stages

    model = tiny_model("llama", num_layers=8)
    original = copy.deepcopy(model)
    config = SGLPConfig(drop=3, compensation=method, cka_minibatch_tokens=16, seq_len=16, n_samples=12, batch_size=4)
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
        assert ("mean cosine distance" in card) == (method == "cosine") == ("cosine_distance" in f)
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    refit = fit_compensation(original, _batches(), result.plan.dropped, method=method)
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
    with pytest.raises(ConfigError, match="compensation_fit"):
        SGLPConfig(drop=1, compensation="least_squares", compensation_fit="later")


def _stacked_branch(model, batches, p, b, module, skip_first=False):
    """`module`'s output (block p's branch) and h_b − Y, every non-padding token (but each row's first)."""
    layers = find_decoder_blocks(model).layers
    ms, zs, seen = [], [], {}
    handles = [module.register_forward_hook(lambda m, a, o: seen.__setitem__("m", o)),
               layers[p].register_forward_hook(lambda m, a, o: seen.__setitem__("p", o[0] if isinstance(o, tuple) else o)),
               layers[b].register_forward_hook(lambda m, a, o: seen.__setitem__("b", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            mask = batch["attention_mask"].bool().clone()
            if skip_first:
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


def _outputs(model, batches, modules, skipped=(), compensation=None):
    """Each of `modules`' output (first item of a tuple), stacked over `batches`' non-padding
    tokens, from `model` with the `skipped` blocks removed and `compensation` applied."""
    outputs = {name: [] for name in modules}
    seen = {}
    handles = [module.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o[0] if isinstance(o, tuple) else o))
               for name, module in modules.items()]
    with torch.no_grad(), applied(model, compensation) if compensation else contextlib.nullcontext(), \
            skip_blocks(model, list(skipped)):
        for batch in batches:
            model(**batch)
            mask = batch["attention_mask"].bool().clone()
            for name in modules:
                outputs[name].append(seen[name][mask])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(values).double() for name, values in outputs.items()}


def test_pruned_fit_fits_each_run_on_the_network_pruned_and_compensated_before_it():
    model = tiny_model("llama", num_layers=8)
    batches = _batches()
    layers = find_decoder_blocks(model).layers
    on_original = fit_compensation(model, batches, [2, 3, 5])
    run_by_run = fit_compensation(model, batches, [2, 3, 5], fit_on="pruned")
    # the first run sees the original network either way
    torch.testing.assert_close(run_by_run.transforms[1], on_original.transforms[1], rtol=1e-9, atol=1e-12)
    assert run_by_run.fits[1]["fit_on"] == "pruned"
    # the second: M and Y of block 4 with blocks 2-3 removed and block 1's T applied; h_5 of the original
    first = Compensation("least_squares", {1: run_by_run.transforms[1]})
    pruned = _outputs(model, batches, {"m": layers[4].mlp, "p": layers[4]}, skipped=[2, 3], compensation=first)
    target = _outputs(model, batches, {"b": layers[5]})["b"]
    m, z = pruned["m"], target - (pruned["p"] - pruned["m"])
    # (Y here is the block's h, there its output less M: float32 rounding, amplified by the solve)
    torch.testing.assert_close(run_by_run.transforms[4], torch.linalg.lstsq(m, z).solution, rtol=1e-4, atol=1e-5)
    assert (run_by_run.transforms[4] - on_original.transforms[4]).abs().max() > 1e-2


def test_cosine_lowers_the_cosine_distance_and_takes_the_least_squares_scale():
    model = tiny_model("llama", num_layers=8)
    batches = _batches()
    least_squares = fit_compensation(model, batches, [3, 4])
    cosine = fit_compensation(model, batches, [3, 4], method="cosine", cosine_steps=50)
    m, z = _stacked(model, batches, 2, 4)

    def distance(t):
        return float((1 - torch.nn.functional.cosine_similarity(m @ t.double(), z, dim=-1)).mean())

    fit = cosine.fits[2]
    assert fit["cosine_distance_least_squares"] == pytest.approx(distance(least_squares.transforms[2]), rel=1e-4)
    assert fit["cosine_distance"] == pytest.approx(distance(cosine.transforms[2]), rel=1e-4)
    assert distance(cosine.transforms[2]) < distance(least_squares.transforms[2]) - 1e-4
    mt = m @ cosine.transforms[2]  # the scale c minimising ‖c M T − z‖² is 1
    assert float((mt * z).sum() / (mt * mt).sum()) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method", ["least_squares", "rescale"])
def test_mixture_of_experts_folds_into_every_expert_and_the_shared_expert(family, method):
    model = tiny_model(family, num_layers=8)
    dropped = [6]  # block 5 is a mixture of experts in all three (qwen2_moe: with a shared expert)
    compensation = fit_compensation(model, _batches(), dropped, method=method)
    t = compensation.transforms[5]
    mlp = find_decoder_blocks(model).layers[5].mlp
    folded = copy.deepcopy(model)
    fold(folded, compensation)
    folded_mlp = find_decoder_blocks(folded).layers[5].mlp
    # the reference, expert by expert: each expert's output (x W_eᵀ) times T is x (Tᵀ W_e)ᵀ
    experts = mlp.experts.down_proj
    assert experts.dim() == 3 and experts.shape[1] == t.shape[0]
    for e in range(experts.shape[0]):
        expected = (t.T @ experts[e].double()).float()
        torch.testing.assert_close(folded_mlp.experts.down_proj[e], expected, rtol=1e-5, atol=1e-6)
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None:
        torch.testing.assert_close(folded_mlp.shared_expert.down_proj.weight,
                                   (t.T @ shared.down_proj.weight.double()).float(), rtol=1e-5, atol=1e-6)
    batch = tiny_batch(batch_size=2, seq_len=12, seed=9, pad_last=2)
    with torch.no_grad(), applied(model, compensation), skip_blocks(model, dropped):
        expected_logits = model(**batch).logits
    with torch.no_grad(), skip_blocks(folded, dropped):
        torch.testing.assert_close(folded(**batch).logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_a_fold_that_is_not_exact_is_undone_with_a_message():
    model = tiny_model("llama", num_layers=6)
    mlp = find_decoder_blocks(model).layers[1].mlp
    plain = mlp.forward
    mlp.forward = lambda x: torch.tanh(plain(x))  # an MLP whose output is not linear in its down projection
    compensation = fit_compensation(model, _batches(1), [2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="did not fold exactly"):
        fold(model, compensation)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method, fit_on", [("least_squares", "pruned"), ("rescale", "original")])
def test_prune_under_sequential_onloading_folds_what_the_in_memory_prune_folds(method, fit_on):
    from sglp_llm import SGLPConfig, prune

    settings = dict(drop=3, compensation=method, compensation_fit=fit_on, cka_minibatch_tokens=16)
    in_memory = prune(tiny_model("llama", num_layers=8), _batches(), SGLPConfig(**settings), progress=False)
    sequential = prune(tiny_model("llama", num_layers=8), _batches(), SGLPConfig(offload="sequential", **settings),
                       progress=False)
    assert sequential.plan.dropped == in_memory.plan.dropped
    assert sequential.plan.extra["verification"]["checks"]
    for p, fit in in_memory.plan.extra["compensation"]["folded"].items():
        assert sequential.plan.extra["compensation"]["folded"][p]["relative_residual"] == pytest.approx(
            fit["relative_residual"], rel=1e-5)
    for (name, a), b in zip(in_memory.model.state_dict().items(), sequential.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_compensation_is_refused_for_blocks_on_disk(tmp_path):
    from sglp_llm import SGLPConfig, prune
    from sglp_llm.model.offload import load_with_blocks_on_disk

    tiny_model("llama", num_layers=6).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="blocks on disk"):
        prune(load_with_blocks_on_disk(tmp_path), _batches(1), SGLPConfig(drop=2, compensation="rescale",
                                                                          cka_minibatch_tokens=16), progress=False)


@pytest.mark.filterwarnings("ignore:accelerate offloads weights")
def test_device_map_with_offloaded_blocks_fits_the_plain_transforms_and_refuses_folding_into_disk(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama", num_layers=6).save_pretrained(tmp_path / "model")
    layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
              "model.layers.3": "disk", "model.layers.4": "disk", "model.layers.5": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "disk"}
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=layout,
                                                  offload_folder=tmp_path / "offload", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    got = fit_compensation(mapped, _batches(), [3, 4], fit_on="pruned")  # blocks 3 and 4 read from disk
    expected = fit_compensation(plain, _batches(), [3, 4], fit_on="pruned")
    torch.testing.assert_close(got.transforms[2], expected.transforms[2], rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match="not in memory"):
        fit_compensation(mapped, _batches(1), [2])  # block 1, which would take T, is on disk


def _compensated_nll(model, batches, skipped, method, fit_on):
    """The brute force: fit the maps for `skipped` from scratch, apply them, run the whole network."""
    from sglp_llm.selection.removal import calibration_nll

    with applied(model, fit_compensation(model, batches, skipped, method=method, fit_on=fit_on)):
        return calibration_nll(model, batches, skipped)


@pytest.mark.parametrize("method, selection, fit_on", [
    ("least_squares", "sglp", "original"), ("rescale", "sglp", "pruned"), ("least_squares", "sleb", "original")])
def test_compensation_aware_selection_is_the_greedy_search_on_compensated_losses(method, selection, fit_on):
    from sglp_llm import SGLPConfig, analyze

    model = tiny_model("llama", num_layers=7)
    batches = _batches(2)
    config = SGLPConfig(drop=2, method=selection, compensation=method, compensation_fit=fit_on, compensation_aware=True,
                        loss_lazy=False, loss_tokens=10**6, cka_minibatch_tokens=16, loss_ties="none")
    plan = analyze(model, batches, config, progress=False)
    steps = plan.extra["sleb_steps"] if selection == "sleb" else plan.extra["loss_check"]["steps"]
    removed: list[int] = []
    for step in steps:  # each step removes the block whose compensated removal leaves the lowest loss
        losses = {b: _compensated_nll(model, batches, removed + [b], method, fit_on)
                  for b in range(1, 6) if b not in removed}
        best = min(losses, key=lambda b: (losses[b], b))
        assert step["block"] == best and step["loss"] == pytest.approx(losses[best], rel=1e-5)
        removed.append(best)
    assert sorted(removed) == plan.dropped
    plain = analyze(model, batches, config.replace(compensation_aware=False), progress=False)
    plain_steps = plain.extra["sleb_steps"] if selection == "sleb" else plain.extra["loss_check"]["steps"]
    assert [s["loss"] for s in plain_steps] != pytest.approx([s["loss"] for s in steps], rel=1e-3)


def test_compensation_aware_settings_are_checked():
    from sglp_llm import SGLPConfig
    from sglp_llm.explain import stages

    with pytest.raises(ConfigError, match="choose one"):
        SGLPConfig(drop=1, compensation_aware=True)
    with pytest.raises(ConfigError, match="measures none"):
        SGLPConfig(drop=1, method="block-influence", compensation="rescale", compensation_aware=True)
    with pytest.raises(ConfigError, match="one block at a time"):
        SGLPConfig(drop=1, compensation="rescale", compensation_aware=True, offload="sequential")
    with pytest.raises(ConfigError, match="protect_first >= 1"):
        SGLPConfig(drop=1, compensation="rescale", protect_first=0)
    lines = stages(SGLPConfig(drop=1, compensation="rescale", compensation_fit="pruned", compensation_aware=True).to_dict())
    assert lines[-2].endswith("each candidate removal measured with its rescale compensation fitted and applied")
    assert lines[-1].endswith("fitted run by run on the network pruned and compensated so far")


def test_compensation_aware_loss_check_measures_every_first_candidate_without_a_screen():
    from sglp_llm import SGLPConfig, analyze

    model = tiny_model("llama", num_layers=7)
    batches = _batches(2)
    config = SGLPConfig(drop=2, compensation="rescale", compensation_aware=True, loss_tokens=10**6,
                        cka_minibatch_tokens=16)  # the default lazy search and its one-sequence screen
    assert config.loss_lazy and config.loss_screen_samples == 1
    steps = analyze(model, batches, config, progress=False).extra["loss_check"]["steps"]
    assert steps[0]["measured"] == steps[0]["candidates"] == 5  # blocks 1-5, none screened away
    removed: list[int] = []
    for step in steps:  # every recorded loss is the compensated network's
        removed.append(step["block"])
        assert step["loss"] == pytest.approx(_compensated_nll(model, batches, removed, "rescale", "original"), rel=1e-5)
