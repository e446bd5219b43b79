"""Peer methods (ShortGPT Block Influence, Gromov et al.'s angular distance, last-n, random, SLEB)
through the SGLP pipeline: scores against direct computations from independently captured hidden
states, the choices against brute force, protection, and the pruned networks."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from sglp_llm import SGLPConfig, analyze, prune
from sglp_llm.selection.baselines import BASELINES, AngularDistance
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.passes.capture import capture_blocks
from sglp_llm.config import METHODS
from sglp_llm.plan import PruningPlan
from tiny_models import tiny_batch, tiny_model

# the main analysis' own work is counted here; the stability halves are tested in test_stability.py
CONFIG = dict(cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4, stability_check=False)
L = 8


def _batches():
    """Right padding (last row) in two batches and left padding (first row) in the third, so
    "non-padding tokens" and "last token of each sequence" both matter."""
    batches = [tiny_batch(batch_size=4, seq_len=16, seed=s, pad_last=p) for s, p in ((0, 5), (1, 0), (2, 9))]
    batches[1]["attention_mask"][0, :6] = 0
    return batches


def _boundary_states(model, batch) -> list[torch.Tensor]:
    """x_0..x_L: the input of every block and the output of the last one. The first L come from
    output_hidden_states; its last entry is after the final norm, so x_L is that norm's input."""
    captured = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    handle.remove()
    return [h.double() for h in (*hidden[:-1], captured[0])]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3", num_layers=L)


def _plan(model, method, **kwargs):
    return analyze(model, _batches(), SGLPConfig(method=method, **{**CONFIG, **kwargs}), progress=False)


def test_every_configurable_method_is_implemented():
    assert set(METHODS) == {"sglp", *BASELINES}


def test_block_influence_equals_direct_computation_and_drops_the_lowest(model):
    cos_sum, n_tokens = torch.zeros(L, dtype=torch.float64), 0
    for batch in _batches():
        states, mask = _boundary_states(model, batch), batch["attention_mask"].bool()
        for block in range(L):
            cos_sum[block] += _cos(states[block][mask], states[block + 1][mask]).sum()
        n_tokens += int(mask.sum())
    expected = 1.0 - cos_sum / n_tokens

    plan = _plan(model, "block-influence", drop=3)
    assert plan.score_kind == "block_influence"
    torch.testing.assert_close(torch.tensor(plan.scores, dtype=torch.float64), expected, rtol=0, atol=1e-6)
    assert plan.n_tokens == n_tokens
    unprotected = sorted(range(1, L - 1), key=lambda b: expected[b].item())
    assert plan.dropped == sorted(unprotected[:3])
    assert plan.segments == [list(range(L))] and plan.keep_per_segment == [L - 3]


def test_angular_distance_equals_direct_computation_and_picks_the_closest_free_run(model):
    n = 2
    total, n_sequences = torch.zeros(L - n + 1, dtype=torch.float64), 0
    for batch in _batches():
        states, mask = _boundary_states(model, batch), batch["attention_mask"].bool()
        last = [int(row.nonzero().max()) for row in mask]
        for start in range(L - n + 1):
            a = torch.stack([states[start][r, t] for r, t in enumerate(last)])
            b = torch.stack([states[start + n][r, t] for r, t in enumerate(last)])
            total[start] += (torch.arccos(_cos(a, b)) / math.pi).sum()
        n_sequences += len(last)
    expected = (total / n_sequences).tolist()

    free_plan = _plan(model, "angular", drop=n, protect_first=0, protect_last=0)
    assert free_plan.score_kind == "angular_distance"
    assert free_plan.scores[L - n + 1 :] == [None] * (n - 1)  # no run of n starts there
    assert free_plan.scores[: L - n + 1] == pytest.approx(expected, rel=0, abs=1e-9)
    best = min(range(L - n + 1), key=lambda s: expected[s])
    assert free_plan.dropped == [best, best + 1]

    # protect blocks so that this run is no longer allowed: the best remaining run wins
    protect = dict(protect_first=best + 1) if best + 1 + n + 1 <= L else dict(protect_last=L - best - 1)
    config = {"protect_first": 0, "protect_last": 0, **protect}
    plan = _plan(model, "angular", drop=n, **config)
    protected = set(range(config["protect_first"])) | set(range(L - config["protect_last"], L))
    allowed = [s for s in range(L - n + 1) if protected.isdisjoint({s, s + 1})]
    chosen = min(allowed, key=lambda s: expected[s])
    assert best not in allowed and plan.dropped == [chosen, chosen + 1]


def test_angular_distance_holds_at_most_a_run_of_block_states():
    model = tiny_model("llama", num_layers=L)
    layers = find_decoder_blocks(model).layers
    for n in (1, 3):
        observer, held = AngularDistance(L, n), []

        def on_block(index, inp, out, observer=observer, held=held):
            observer.on_block(index, inp, out)
            held.append(len(observer._window))

        batch = tiny_batch(batch_size=3, seq_len=10, pad_last=4)
        observer.start_batch(batch["attention_mask"].bool())
        with torch.no_grad(), capture_blocks(layers, on_block):
            model(**batch)
        observer.finish_batch()
        assert max(held) == n - 1 and held[-1] == 0
        assert observer.n_sequences == 3 and torch.isfinite(observer.compute()[: L - n + 1]).all()


@pytest.mark.parametrize(
    "protect_first, protect_last, expected",
    [(1, 1, [4, 5, 6]), (1, 0, [5, 6, 7]), (0, 2, [3, 4, 5])],
)
def test_last_drops_the_deepest_unprotected_blocks(model, protect_first, protect_last, expected):
    plan = _plan(model, "last", drop=3, protect_first=protect_first, protect_last=protect_last)
    assert plan.dropped == expected
    assert plan.score_kind == "none" and plan.scores == [None] * L
    assert plan.n_batches == 3 and len(plan.cka) == L  # the data still went through: CKA is reported


def test_random_is_seeded_and_respects_protection(model):
    picks = {}
    for seed in range(6):
        plan = _plan(model, "random", drop=3, seed=seed, protect_first=2)
        assert plan.dropped == sorted(random.Random(seed).sample(range(2, L - 1), 3))
        assert _plan(model, "random", drop=3, seed=seed, protect_first=2).dropped == plan.dropped
        picks[seed] = tuple(plan.dropped)
    assert len(set(picks.values())) > 1


def test_baselines_report_the_same_cka_as_sglp(model):
    reference = _plan(model, "sglp", drop=2).cka
    for method in BASELINES:
        torch.testing.assert_close(torch.tensor(_plan(model, method, drop=2).cka), torch.tensor(reference))


def _identity_hooks(model, blocks):
    """Forward hooks that make `blocks` pass their input through unchanged."""
    layers = find_decoder_blocks(model).layers
    return [
        layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
        for i in blocks
    ]


def _mean_nll(model, batches, skipped) -> float:
    """NLL summed over every predicted non-padding token, from the logits, per such token."""
    handles = _identity_hooks(model, skipped)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                logits = model(**batch, use_cache=False).logits[:, :-1]
                targets, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
                total += F.cross_entropy(logits[mask].double(), targets[mask], reduction="sum").item()
                count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return total / count


def _greedy_elimination(model, batches, n_drop, candidates):
    """SLEB from the paper, written independently: at each step remove the candidate whose removal
    (with the blocks already removed) gives the lowest NLL. Returns the full model's NLL and the
    (block, NLL) of each step."""
    removed, steps, candidates = [], [], list(candidates)
    for _ in range(n_drop):
        losses = {b: _mean_nll(model, batches, removed + [b]) for b in candidates}
        best = min(losses, key=losses.get)
        steps.append((best, losses[best]))
        removed.append(best)
        candidates.remove(best)
    return _mean_nll(model, batches, []), steps


def _check_sleb(plan, base, steps):
    """The plan removed the blocks of `steps`, in that order, with their losses and increases."""
    blocks = [b for b, _ in steps]
    losses = [base] + [loss for _, loss in steps]
    assert plan.score_kind == "sleb_loss"
    assert plan.dropped == sorted(blocks)
    assert [s["block"] for s in plan.extra["sleb_steps"]] == blocks
    assert [s["loss"] for s in plan.extra["sleb_steps"]] == pytest.approx(losses[1:], rel=1e-5)
    expected = [None] * plan.num_blocks
    for step, block in enumerate(blocks):
        expected[block] = pytest.approx(losses[step + 1] - losses[step], rel=1e-3, abs=1e-6)
    assert plan.scores == expected


def test_sleb_removes_what_a_brute_force_greedy_search_removes(model):
    base, steps = _greedy_elimination(model, _batches(), 3, range(1, L - 1))
    for n in (1, 2, 3):
        plan = _plan(model, "sleb", drop=n)
        _check_sleb(plan, base, steps[:n])
        assert plan.timings["total_s"] >= plan.timings["selection_s"] > 0


def test_sleb_respects_protection_and_scores_on_sleb_batches(model):
    batches = _batches()[:1]
    base, free_steps = _greedy_elimination(model, batches, 2, range(L))
    _check_sleb(_plan(model, "sleb", drop=2, sleb_batches=1, protect_first=0, protect_last=0), base, free_steps)

    # protect the first block the free search removed: the search goes on without it
    first = free_steps[0][0]
    config = dict(protect_first=first + 1, protect_last=0) if first < L // 2 else dict(protect_first=0, protect_last=L - first)
    protected = set(range(config["protect_first"])) | set(range(L - config["protect_last"], L))
    _, steps = _greedy_elimination(model, batches, 2, [b for b in range(L) if b not in protected])
    plan = _plan(model, "sleb", drop=2, sleb_batches=1, **config)
    _check_sleb(plan, base, steps)
    assert first not in plan.dropped


def test_sleb_breaks_ties_towards_the_shallower_block():
    """With every middle block an exact identity, all candidates leave the same loss."""
    model = tiny_model("llama", num_layers=L)
    with torch.no_grad():
        for layer in find_decoder_blocks(model).layers[1:-1]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    plan = _plan(model, "sleb", drop=3)
    assert plan.dropped == [1, 2, 3] and [s["block"] for s in plan.extra["sleb_steps"]] == [1, 2, 3]
    assert plan.scores == [None, 0.0, 0.0, 0.0, None, None, None, None]


def test_sleb_is_deterministic_and_scores_without_dropout():
    model = tiny_model("llama", num_layers=L, attention_dropout=0.5).train()
    first, second = _plan(model, "sleb", drop=2), _plan(model, "sleb", drop=2)
    assert model.training
    reference = _plan(model.eval(), "sleb", drop=2)
    for plan in (first, second):
        assert (plan.dropped, plan.scores, plan.extra) == (reference.dropped, reference.scores, reference.extra)


def test_sleb_refuses_a_non_finite_candidate_loss():
    """Block 4 overflows once a block before it is removed (its layer index changes)."""
    model = tiny_model("llama", num_layers=L)
    find_decoder_blocks(model).layers[4].register_forward_hook(
        lambda m, a, k, o: o if m.self_attn.layer_idx == 4 else o * math.nan, with_kwargs=True
    )
    # verify=False: the trial rewrite would rightly refuse a model that depends on layer_idx so
    with pytest.raises(FloatingPointError, match=r"^The calibration loss without blocks \[1\] is nan: the model overflows on this data\. Load it in float32 or bfloat16 instead of float16 \(--dtype\)\.$"):
        _plan(model, "sleb", drop=2, verify=False)


@pytest.mark.parametrize("method", METHODS)
def test_only_sglp_runs_a_backward(model, monkeypatch, method):
    backward, grad_enabled = [], []
    original = torch.Tensor.backward

    def counting_backward(self, *args, **kwargs):
        backward.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    # SGLP: the last block, since its loss check starts from the statistics pass's outputs and
    # need not run block 0 again
    handle = find_decoder_blocks(model).layers[-1 if method == "sglp" else 0].register_forward_hook(
        lambda *_: grad_enabled.append(torch.is_grad_enabled())
    )
    try:  # SGLP with a GradNorm shortlist (the default loss check of every block runs none);
        # no trial rewrite (sglp_llm.output.verify) before the pass, whose forwards are counted here
        _plan(model, method, drop=2, verify=False, **({"loss_candidates": 4} if method == "sglp" else {}))
    finally:
        handle.remove()
    sglp = method == "sglp"
    # per batch: the head's gradient into a leaf (one chunk here), then one backward down the blocks
    assert len(backward) == (2 * 3 if sglp else 0)
    # SLEB: the observer pass, the full model, then 6 and 5 candidates (block 0 runs in each)
    passes = {"sleb": 1 + 1 + 6 + 5}.get(method, 1)
    if sglp:  # the statistics pass with grad, then the loss check's candidate forwards without
        assert grad_enabled[:3] == [True] * 3 and len(grad_enabled) > 3 and not any(grad_enabled[3:])
    else:
        assert grad_enabled == [False] * 3 * passes


@pytest.mark.parametrize("method", METHODS)
def test_pruned_model_equals_original_with_the_dropped_blocks_skipped(method):
    model, reference = tiny_model("gemma2", num_layers=L), tiny_model("gemma2", num_layers=L)
    result = prune(model, _batches(), SGLPConfig(method=method, drop=3, **CONFIG), progress=False)
    assert len(result.plan.dropped) == 3 and not {0, L - 1} & set(result.plan.dropped)
    layers = find_decoder_blocks(reference).layers
    for i in result.plan.dropped:
        layers[i].register_forward_hook(
            lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True
        )
    batch = tiny_batch(pad_last=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)
    assert model.config.sglp["kept_layers"] == result.plan.kept
    assert model.config.sglp["settings"]["method"] == method


def test_a_baseline_plan_saves_as_strict_json_with_an_honest_card(tmp_path):
    config = SGLPConfig(method="angular", drop=2, **CONFIG)
    result = prune(tiny_model("llama", num_layers=6), _batches(), config, progress=False)
    out = result.save_pretrained(tmp_path / "pruned")

    def no_nan(name):
        raise AssertionError(f"{name} in the report")

    report = json.loads((out / "sglp_report.json").read_text(), parse_constant=no_nan)
    assert report["scores"][-1] is None and report["score_kind"] == "angular_distance"
    assert PruningPlan.load(out / "sglp_report.json") == result.plan
    card = (out / "README.md").read_text()
    assert "depth-pruned with angular distance (4 of 6 blocks)" in card and "Gromov et al. 2024" in card
    assert "5: –" in card and "5:–" in result.plan.summary()


def test_sleb_runs_for_several_drop_counts_share_their_greedy_steps():
    from sglp_llm import SGLPConfig, analyze
    from tiny_models import tiny_batch, tiny_model

    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=2, seq_len=12, seed=s) for s in range(2)]
    common = dict(method="sleb", cka_minibatch_tokens=8)
    cache: dict = {}
    shared = {n: analyze(model, batches, SGLPConfig(drop=n, **common), progress=False, statistics_cache=cache)
              for n in (3, 1, 2)}
    for n, plan in shared.items():
        fresh = analyze(model, batches, SGLPConfig(drop=n, **common), progress=False)
        assert plan.dropped == fresh.dropped and plan.extra["sleb_steps"] == fresh.extra["sleb_steps"]
        assert plan.scores == pytest.approx(fresh.scores, nan_ok=True)
    (steps,) = [v["steps"] for k, v in cache.items() if k[0] == "sleb-steps"]
    assert len(steps) == 3  # the runs for 1 and 2 reused the run for 3
    # each plan is charged the time of its own steps
    assert shared[1].timings["selection_s"] < shared[3].timings["selection_s"]
