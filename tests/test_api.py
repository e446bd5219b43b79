"""analyze/prune end to end on tiny models: determinism, constraints, and the pruned network."""

from __future__ import annotations

import math

import pytest
import torch

from sglp_llm import ConfigError, SGLPConfig, analyze, prune
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.data import first_tokens
from tiny_models import tiny_batch, tiny_model, tiny_tokenizer

# the main analysis' own work is counted here; the stability halves are tested in test_stability.py
CONFIG = dict(cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4, stability_check=False)


def _batches(n=3):
    return [tiny_batch(batch_size=4, seq_len=16, seed=s) for s in range(n)]


def test_analyze_leaves_model_unchanged_and_is_deterministic():
    model = tiny_model("llama", num_layers=10)
    batch = tiny_batch()
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model(**batch).logits
    config = SGLPConfig(drop=3, **CONFIG)
    first = analyze(model, _batches(), config, progress=False)
    second = analyze(model, _batches(), config, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert first.dropped == second.dropped and first.cka == second.cka and first.scores == second.scores
    assert first.n_tokens == 3 * 4 * 16 and first.n_batches == 3


def test_plan_respects_drop_count_protection_and_segments():
    model = tiny_model("qwen3", num_layers=12)
    plan = analyze(model, _batches(), SGLPConfig(drop=5, scoring="block", **CONFIG), progress=False)
    assert len(plan.dropped) == 5 and sorted(plan.dropped + plan.kept) == list(range(12))
    assert 0 not in plan.dropped and 11 not in plan.dropped
    flat = [i for seg in plan.segments for i in seg]
    assert flat == list(range(12))
    for seg, keep in zip(plan.segments, plan.keep_per_segment):
        kept_here = [i for i in seg if i in plan.kept]
        assert len(kept_here) == keep >= 1
    # within each segment the dropped blocks are the lowest-scored ones
    for seg in plan.segments:
        dropped = [i for i in seg if i in plan.dropped]
        kept = [i for i in seg if i in plan.kept and i not in (0, 11)]
        if dropped and kept:
            assert max(plan.scores[i] for i in dropped) <= min(plan.scores[i] for i in kept)


def test_automatic_k_is_lowered_until_the_drop_fits():
    model = tiny_model("llama", num_layers=8)
    plan = analyze(model, _batches(), SGLPConfig(drop=5, groups=True, auto_k="reference", auto_k_threshold=0.0, **CONFIG), progress=False)
    import numpy as np

    from sglp_llm.selection.segment import segment_blocks

    unconstrained = segment_blocks(np.array(plan.cka), threshold=0.0)
    assert len(plan.dropped) == 5
    assert len(plan.segments) < unconstrained.k
    removable = [min(len(s) - 1, len([i for i in s if i not in (0, 7)])) for s in plan.segments]
    assert sum(removable) >= 5


def test_fixed_segment_count_that_cannot_fit_is_refused():
    model = tiny_model("llama", num_layers=8)
    with pytest.raises(ValueError, match="at most"):
        analyze(model, _batches(), SGLPConfig(drop=5, groups=True, num_segments=6, **CONFIG), progress=False)


def test_prune_equals_original_with_dropped_blocks_skipped():
    model = tiny_model("gemma2", num_layers=8)
    reference = tiny_model("gemma2", num_layers=8)
    result = prune(model, _batches(), SGLPConfig(ratio=0.25, **CONFIG), progress=False)
    assert len(result.plan.dropped) == 2
    layers = find_decoder_blocks(reference).layers
    for i in result.plan.dropped:
        layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
    batch = tiny_batch(pad_last=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)
    assert model.config.sglp["kept_layers"] == result.plan.kept
    assert model.config.sglp["settings"]["ratio"] == 0.25
    assert result.plan.extra["params_after"] < result.plan.extra["params_before"]


def test_subset_search_picks_the_best_keep_set_by_network_gradnorm():
    """Against brute force: every way to drop the segment's share of unprotected blocks, each
    scored by the GradNorm of the network without them (other segments intact)."""
    from itertools import combinations

    from sglp_llm.model.rewrite import skip_blocks
    from sglp_llm.statistics.score import network_gradnorm

    model = tiny_model("llama", num_layers=8)
    batches = _batches()
    plan = analyze(model, batches, SGLPConfig(drop=3, groups=True, num_segments=2, scoring="subset", **CONFIG), progress=False)
    searched = 0
    for seg in plan.segments:
        dropped_here = [i for i in seg if i in plan.dropped]
        if not dropped_here:
            continue
        scores = {}
        for drop in combinations([i for i in seg if i not in (0, 7)], len(dropped_here)):
            with skip_blocks(model, list(drop)):
                scores[drop] = network_gradnorm(model, batches[:1])
        best = plan.extra["subset_search"][f"{seg[0]}-{seg[-1]}"]
        assert len(scores) == best["candidates"] > 1
        assert max(scores, key=scores.get) == tuple(dropped_here)
        assert scores[tuple(dropped_here)] == pytest.approx(best["best_score"], rel=1e-9)
        searched += 1
    assert searched and len(plan.dropped) == 3


def test_texts_need_a_tokenizer_and_work_with_one():
    model = tiny_model("mistral", num_layers=6)
    texts = ["the module provides a class for the object that is returned by the function " * 20] * 4
    config = SGLPConfig(drop=2, **CONFIG)
    with pytest.raises(ConfigError, match="tokenizer"):
        analyze(model, texts, config, progress=False)
    plan = analyze(model, texts, config, tokenizer=tiny_tokenizer(), progress=False)
    assert len(plan.dropped) == 2 and plan.calibration_source == "texts given in Python"


def test_missing_config_and_mismatched_plan_are_refused():
    model = tiny_model("llama", num_layers=6)
    with pytest.raises(ConfigError, match="Pass an SGLPConfig"):
        analyze(model, _batches())
    plan = analyze(model, _batches(), SGLPConfig(drop=1, **CONFIG), progress=False)
    with pytest.raises(ConfigError, match="made for a model with 6 blocks, but this model has 8"):
        prune(tiny_model("llama", num_layers=8), plan=plan)


@pytest.mark.parametrize("scoring", ["loss", "block"])
def test_a_non_finite_calibration_loss_is_refused(scoring):
    """The blocks stay finite (CKA accepts them); only the logits overflow. GradNorm's pass meets
    the loss first; without GradNorm the pass stops before the head, and the loss check's first
    measurement (the unpruned network's loss) does."""
    model = tiny_model("llama", num_layers=6)
    model.lm_head.register_forward_hook(lambda m, a, o: o * float("inf"))
    with pytest.raises(FloatingPointError, match=r"^The calibration loss is nan: the model overflows on this data\. Load it in float32 or bfloat16 instead of float16 \(--dtype\)\.$"):
        analyze(model, _batches(), SGLPConfig(drop=1, scoring=scoring, **CONFIG), progress=False)


def test_a_calibration_token_the_model_never_predicts_is_named_as_a_cause():
    """Models that mask tokens out of their predictions (Chameleon's image placeholders) give such
    a token's NLL as +inf: the refusal names that cause beside float16 overflow."""
    model = tiny_model("llama", num_layers=6)
    never = int(_batches()[0]["input_ids"][0, 3])
    model.lm_head.register_forward_hook(lambda m, a, o: o.index_fill(-1, torch.tensor([never]), -torch.inf))
    with pytest.raises(FloatingPointError, match=r"^The calibration loss is inf: .* Or the model gives some calibration "
                                                 r"token no probability at all \(a token it never predicts"):
        analyze(model, _batches(), SGLPConfig(drop=1, **CONFIG), progress=False)


@pytest.mark.parametrize("allocation,candidates", [("size", 2), ("loss", 2), ("loss", "all")])
def test_loss_check_removes_the_best_gradnorm_candidate_by_calibration_loss(allocation, candidates):
    """Brute force: at each step, among the `loss_candidates` lowest-GradNorm blocks (or all
    blocks) of each segment with drops left (allocated by size, or any segment keeping one block
    with allocation="loss"), the removal with the lowest calibration loss goes."""
    from sglp_llm.model.rewrite import skip_blocks

    model = tiny_model("llama", num_layers=10)
    batches = _batches()
    config = SGLPConfig(drop=3, groups=True, num_segments=3, scoring="loss", loss_candidates=candidates, loss_tokens=128,
                        loss_lazy=False, loss_screen_samples=0, allocation=allocation, loss_ties="none", **CONFIG)
    plan = analyze(model, batches, config, progress=False)

    def loss(skipped):
        total = count = 0
        with torch.no_grad(), skip_blocks(model, skipped):
            for b in batches[:2]:
                n = int(b["attention_mask"][:, 1:].sum())
                total += model(**b, labels=b["input_ids"]).loss.item() * n
                count += n
        return total / count

    if allocation == "size":
        left = {i: len(s) - k for i, (s, k) in enumerate(zip(plan.segments, plan.keep_per_segment))}
    else:
        left = {i: min(len(s) - 1, sum(b not in (0, 9) for b in s)) for i, s in enumerate(plan.segments)}
    first_left, removed = dict(left), []
    for step in plan.extra["loss_check"]["steps"]:
        candidates = []
        for i, seg in enumerate(plan.segments):
            if left[i]:
                free = [b for b in seg if b not in (0, 9) and b not in removed]
                candidates += free if config.loss_candidates == "all" else sorted(free, key=lambda b: (plan.scores[b], b))[:2]
        assert step["candidates"] == len(candidates)
        best = min(candidates, key=lambda b: (loss(removed + [b]), b))
        assert step["block"] == best and step["loss"] == pytest.approx(loss(removed + [best]), rel=1e-6)
        removed.append(best)
        left[next(i for i, s in enumerate(plan.segments) if best in s)] -= 1
    assert sorted(removed) == plan.dropped and len(removed) == 3
    if config.loss_candidates == "all":  # no GradNorm: the plan reports each block's loss when removed alone
        assert plan.score_kind == "loss_without_block"
        alone = [b for i, seg in enumerate(plan.segments) if first_left[i] for b in seg if b not in (0, 9)]
        assert len(alone) > 3 and [s is not None for s in plan.scores] == [b in alone for b in range(10)]
        for b in alone:
            assert plan.scores[b] == pytest.approx(loss([b]), rel=1e-6)
    assert [len(s) - k for s, k in zip(plan.segments, plan.keep_per_segment)] == [
        sum(b in s for b in removed) for s in plan.segments
    ]


def _synthetic_losses(monkeypatch, loss):
    """The loss check's measurements replaced by `loss(removed blocks)`; returns the list of
    measured sets."""
    measured = []

    def fake(self, block):
        measured.append(sorted(self.removed + [block]))
        return loss(measured[-1])

    monkeypatch.setattr("sglp_llm.selection.removal.RemovalLoss.measure", fake)
    monkeypatch.setattr("sglp_llm.selection.removal.RemovalLoss.current", lambda self: loss(sorted(self.removed)))
    return measured


def test_lazy_loss_check_makes_the_full_choice_with_fewer_measurements(monkeypatch):
    """A loss that grows with the removed set (each block's cost, plus interactions between
    neighbours): the lazy search must pick what the full search picks, measuring less."""
    cost = {1: 5.0, 2: 1.0, 3: 1.2, 4: 3.0, 5: 1.1, 6: 0.9, 7: 4.0, 8: 1.3}

    def loss(removed):
        return sum(cost[b] for b in removed) + sum(2.0 for b in removed if b + 1 in removed)

    model = tiny_model("llama", num_layers=10)
    # the lowest loss goes (no near-tie rule: the synthetic losses have no per-sequence spread)
    settings = dict(drop=4, groups=True, num_segments=1, scoring="loss", loss_candidates=8, allocation="loss",
                    loss_screen_samples=0, loss_ties="none", **CONFIG)
    plans, counts = {}, {}
    modes = {False: dict(loss_lazy=False), True: dict(loss_bound="stale"), "marginal": dict(loss_bound="marginal")}
    for mode, chosen in modes.items():
        measured = _synthetic_losses(monkeypatch, loss)
        plans[mode] = analyze(model, _batches(), SGLPConfig(**chosen, **settings), progress=False)
        counts[mode] = len(measured)
    # greedy by hand: 6 (0.9), 2 (1.0), 8 (1.3; 3 costs 1.2 + 2 next to 2), then 4 (3.0; 3 and 5
    # cost 3.2 and 3.1 next to removed neighbours)
    assert plans[True].dropped == plans[False].dropped == plans["marginal"].dropped == [2, 4, 6, 8]
    assert counts[False] == 8 + 7 + 6 + 5
    # a block's damage never shrinks here, so the marginal bound holds and is tighter. Stale, step
    # 2 (loss 0.9 so far): 2, 5, 3 and 8 have stale losses below 2's fresh 1.9 and are measured.
    # Marginal: 2's bound 0.9 + 1.0 is the lowest and its measurement confirms it; at step 3
    # (1.9) 5 and 3 (bounds 3.0, 3.1) are measured (5.0, 5.1: next to removed blocks) before 8.
    measured_per_step = {mode: [s["measured"] for s in plans[mode].extra["loss_check"]["steps"]] for mode in modes}
    assert measured_per_step[True] == [8, 4, 3, 5] and measured_per_step["marginal"] == [8, 1, 3, 1]
    assert counts["marginal"] == 13 < counts[True] == 20 < counts[False]

def test_local_bound_keeps_the_neighbour_effects_that_the_marginal_bound_misses(monkeypatch):
    """Blocks 4 and 5 are one redundant pair: with 5 gone, 4 costs only 0.1 more. The full
    search takes 5 (1.0), then 4 (1.1). The marginal bound puts 4 at 1.0 + 2.9 and takes 2 (3.0)
    without measuring 4 again; the local bound falls back to 4's stale 2.9, since its kept
    neighbour changed, as it does for 6 (2.5, measured first: 3.5)."""
    cost = {1: 5.0, 2: 2.0, 3: 4.0, 4: 2.9, 5: 1.0, 6: 2.5, 7: 4.0, 8: 5.0}

    def loss(removed):
        return sum(cost[b] for b in removed) - (2.8 if {4, 5} <= set(removed) else 0.0)

    model = tiny_model("llama", num_layers=10)
    # the synthetic losses have no per-sequence spread: no near-tie rule, no screen allowance
    settings = dict(drop=2, groups=True, num_segments=1, scoring="loss", loss_candidates=8, allocation="loss",
                    loss_ties="none", loss_screen_errors=0, **CONFIG)
    per_step = {}
    for bound, screen, dropped in (
        ("stale", 0, [4, 5]), ("local", 0, [4, 5]), ("marginal", 0, [2, 5]), ("local", 4, [4, 5])
    ):
        measured = _synthetic_losses(monkeypatch, loss)
        config = SGLPConfig(loss_bound=bound, loss_screen_samples=screen, **settings)
        plan = analyze(model, _batches(), config, progress=False)
        assert plan.dropped == dropped, bound
        per_step[bound, screen] = [s["measured"] for s in plan.extra["loss_check"]["steps"]]
        assert sum(per_step[bound, screen]) == len(measured) - (8 if screen else 0)
    # screened (here exact) estimates bound like measurements: 5 is confirmed at once, and at
    # step 2, 2's bound is 1.0 + 2.0 (not its estimate 2.0, which would be measured first)
    assert per_step == {
        ("stale", 0): [8, 3], ("local", 0): [8, 2], ("marginal", 0): [8, 1], ("local", 4): [1, 2]
    }


def test_screened_first_step_estimates_each_removal_on_the_first_sequences():
    """With loss_screen_samples, the first step's estimate of each removal is the unpruned
    loss on the loss batches plus the increase on the first sequences (checked against direct
    losses); every removal is still decided on a measurement of the loss batches. Screening on
    every sequence of the loss batches is the unscreened search."""
    from sglp_llm.model.rewrite import skip_blocks

    model = tiny_model("llama", num_layers=10)
    batches = _batches()

    def loss(skipped, rows=None):
        total = count = 0
        with torch.no_grad(), skip_blocks(model, skipped):
            for b in batches[:2]:
                b = b if rows is None else {k: v[:rows] for k, v in b.items()}
                n = int(b["attention_mask"][:, 1:].sum())
                total += model(**b, labels=b["input_ids"]).loss.item() * n
                count += n
                if rows is not None:
                    break
        return total / count

    settings = dict(drop=3, groups=True, num_segments=2, scoring="loss", loss_tokens=128, **CONFIG)
    plain = analyze(model, batches, SGLPConfig(loss_screen_samples=0, **settings), progress=False)
    whole = analyze(model, batches, SGLPConfig(loss_screen_samples=8, **settings), progress=False)
    assert whole.dropped == plain.dropped
    assert whole.scores == pytest.approx(plain.scores, rel=1e-5, nan_ok=True)

    screened = analyze(model, batches, SGLPConfig(loss_screen_samples=2, **settings), progress=False)
    candidates = [b for b in range(1, 9)]
    for b in candidates:
        assert screened.scores[b] == pytest.approx(loss([]) + loss([b], rows=2) - loss([], rows=2), rel=1e-5)
    removed = []
    for step in screened.extra["loss_check"]["steps"]:
        removed.append(step["block"])
        assert step["loss"] == pytest.approx(loss(removed), rel=1e-6)
    assert sorted(removed) == screened.dropped and len(removed) == 3
    first = screened.extra["loss_check"]["steps"][0]
    assert first["candidates"] == len(candidates) and first["measured"] < first["candidates"]


def test_screen_allowance_is_the_spread_of_a_subsample_mean():
    """The allowance at one error is the standard deviation of the mean of `screened` of the
    sequences' increases, over every way of drawing them (brute force), from their standard error."""
    import itertools
    import statistics

    from sglp_llm.selection.loss_check import screen_allowance

    increases = [0.31, 0.05, 0.12, 0.4, 0.22, 0.08, 0.19]
    n = len(increases)
    error = statistics.stdev(increases) / n**0.5
    for m in (1, 2, 3, 6):
        means = [sum(c) / m for c in itertools.combinations(increases, m)]
        assert screen_allowance(error, n, m, 1.0) == pytest.approx(statistics.pstdev(means), rel=1e-12)
        assert screen_allowance(error, n, m, 2.5) == pytest.approx(2.5 * statistics.pstdev(means), rel=1e-12)
    assert screen_allowance(error, n, n, 1.0) == 0.0


def test_a_screen_that_puts_the_best_removal_a_little_too_high_does_not_hide_it(monkeypatch):
    """A planted screen: every candidate's estimate is its true loss on the loss batches, the
    best's raised past the second best's by less than the allowance. Taken as a bound (errors 0),
    the estimate hides the best and the search removes the second best; lowered by the allowance
    (loss_screen_errors 1, the default), the best is measured and goes, as in the unscreened search.
    The KL objective's steps record no allowance."""
    from sglp_llm.selection import loss_check

    model = tiny_model("llama", num_layers=10)
    batches = _batches()
    settings = dict(drop=1, scoring="loss", loss_tokens=128, loss_ties="none", **CONFIG)
    plain = analyze(model, batches, SGLPConfig(loss_screen_samples=0, **settings), progress=False)
    true = {b: loss for b, loss in enumerate(plain.extra["loss_check"]["removal_losses"]) if loss is not None}
    best, second = sorted(true, key=true.get)[:2]
    raised = {**true, best: true[second] + 1e-4}
    monkeypatch.setattr(loss_check, "_screen", lambda context, part, candidates, loss, store: dict(raised))

    blind = analyze(model, batches, SGLPConfig(loss_screen_errors=0, **settings), progress=False)
    assert blind.dropped == [second]
    assert blind.extra["loss_check"]["steps"][0]["measured"] == 1
    screened = analyze(model, batches, SGLPConfig(**settings), progress=False)
    step = screened.extra["loss_check"]["steps"][0]
    assert screened.dropped == plain.dropped == [best]
    assert step["screen_allowance"] > true[second] + 1e-4 - true[best] > 0
    assert step["loss"] == pytest.approx(true[best], rel=1e-6)
    # the KL objective keeps no per-sequence spread, so nothing lowers its screened estimates: no allowance recorded
    kl = analyze(model, batches, SGLPConfig(loss_objective="kl", **settings), progress=False)
    assert "screen_allowance" not in kl.extra["loss_check"]["steps"][0]


def test_redundancy_allocation_matches_a_hand_worked_example(monkeypatch):
    """Segments [0-3] (mean CKA 0.9) and [4-9] (mean CKA 0.3), drop 4, nothing protected:
    weights 4*0.9 = 3.6 and 6*0.3 = 1.8 -> quotas 4*3.6/5.4 = 2.67 and 1.33 -> 3 and 1
    (by size it would be 1.6 and 2.4 -> 2 and 2)."""
    import sglp_llm.api as api

    groups = [0] * 4 + [1] * 6
    cka = torch.tensor([[1.0 if a == b else 0.0 for b in groups] for a in groups], dtype=torch.float64)
    for i in range(10):
        for j in range(10):
            if i != j and groups[i] == groups[j]:
                cka[i, j] = 0.9 if groups[i] == 0 else 0.3
    stats = api.BlockStatistics(cka, torch.arange(10, 0, -1, dtype=torch.float64), 10, 1)
    monkeypatch.setattr(api, "collect_block_statistics", lambda *a, **k: stats)
    model = tiny_model("llama", num_layers=10)
    common = dict(drop=4, groups=True, num_segments=2, protect_first=0, protect_last=0, scoring="block", **CONFIG)
    plan = analyze(model, _batches(1), SGLPConfig(allocation="redundancy", **common), progress=False)
    assert plan.segments == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert plan.keep_per_segment == [1, 5]
    # scores fall with depth, so the deepest blocks of each segment go
    assert plan.dropped == [1, 2, 3, 9]
    by_size = analyze(model, _batches(1), SGLPConfig(allocation="size", **common), progress=False)
    assert by_size.keep_per_segment == [2, 4]


def test_statistics_cache_shares_one_pass_and_gives_the_same_plans(monkeypatch):
    import sglp_llm.api as api

    passes = []
    collect = api.collect_block_statistics
    monkeypatch.setattr(api, "collect_block_statistics", lambda *a, **k: passes.append(1) or collect(*a, **k))
    model = tiny_model("llama", num_layers=10)
    cache: dict = {}
    configs = [SGLPConfig(drop=n, **CONFIG) for n in (2, 4)] + [
        SGLPConfig(drop=2, segment_feature="rows", **CONFIG),
        SGLPConfig(drop=2, method="block-influence", **CONFIG),
        SGLPConfig(drop=2, method="angular", **CONFIG),
        SGLPConfig(drop=3, method="angular", **CONFIG),
    ]
    shared = [analyze(model, _batches(), c, progress=False, statistics_cache=cache) for c in configs]
    assert len(passes) == 4  # gradnorm once, block influence once, angular per run length
    fresh = [analyze(model, _batches(), c, progress=False) for c in configs]
    for a, b in zip(shared, fresh):
        assert a.dropped == b.dropped and a.scores == b.scores and a.cka == b.cka
    assert [p.extra["statistics_reused"] for p in shared] == [False, True, True, False, False, False]
    assert shared[1].timings["total_s"] >= shared[1].timings["statistics_s"] > 0


def test_the_statistics_pass_runs_the_head_only_for_a_gradient_score():
    """CKA needs the blocks only; the head (most of a forward for a large vocabulary) runs
    when a gradient score needs the loss, and the CKA is the same either way."""
    from sglp_llm.api import collect_block_statistics
    from sglp_llm.data import CalibrationSet

    model = tiny_model("gemma3_text", num_layers=6)
    heads = []
    model.lm_head.register_forward_hook(lambda *args: heads.append(1))
    calibration = CalibrationSet(batches=_batches(), n_tokens=3 * 4 * 16, source="test", n_samples=12, seq_len=16)
    stats = {}
    for scoring in ("loss", "block"):
        heads.clear()
        stats[scoring] = collect_block_statistics(model, calibration, SGLPConfig(drop=2, scoring=scoring, **CONFIG), 2, progress=False)
        assert len(heads) == (3 if scoring == "block" else 0)
    torch.testing.assert_close(stats["loss"].cka, stats["block"].cka, rtol=1e-6, atol=1e-9)
    assert not stats["loss"].gradient_scores and set(stats["block"].gradient_scores) == {"taylor", "fisher", "gradnorm"}
    assert all(map(math.isfinite, stats["block"].gradient_scores["taylor"]))


def test_a_loss_check_of_every_block_computes_no_gradient_score(monkeypatch):
    """No backward: a gradient score would only order candidates that are all tried anyway."""
    def no_backward(*args, **kwargs):
        raise AssertionError("gradient score computed")

    monkeypatch.setattr("sglp_llm.api.GateScores", no_backward)
    model = tiny_model("llama", num_layers=8)
    plan = analyze(model, _batches(), SGLPConfig(drop=2, scoring="loss", loss_candidates="all", **CONFIG), progress=False)
    assert len(plan.dropped) == 2 and plan.score_kind == "loss_without_block"
    with pytest.raises(AssertionError, match="gradient score computed"):
        analyze(model, _batches(), SGLPConfig(drop=2, scoring="loss", loss_candidates=4, **CONFIG), progress=False)


def test_taylor_screen_estimates_each_first_removal_from_the_gate_score_and_measures_the_promising(monkeypatch):
    """`loss_screen: taylor`: the first step's estimates are the unpruned loss plus each block's
    Taylor score; candidates are measured lowest estimate first, until a measured loss is no
    higher than every unmeasured candidate's estimate, and the lowest measured one goes."""
    from sglp_llm.selection.removal import RemovalLoss
    from sglp_llm.selection.removal import calibration_nll

    measured = []
    real = RemovalLoss.measure

    def spy(self, block):
        loss = real(self, block)
        if not self.removed:
            measured.append((block, loss))
        return loss

    monkeypatch.setattr(RemovalLoss, "measure", spy)
    model = tiny_model("llama", num_layers=10)
    batches = _batches()
    config = SGLPConfig(drop=2, groups=True, num_segments=2, scoring="loss", loss_screen="taylor", gradient_score="taylor",
                        loss_bound="stale", loss_ties="none", **CONFIG)
    plan = analyze(model, batches, config, progress=False)
    check = plan.extra["loss_check"]
    taylor = plan.extra["gradient_scores"]["taylor"]
    assert plan.score_kind == "taylor" and plan.scores == taylor
    base = calibration_nll(model, first_tokens(batches, config.loss_tokens), [])
    estimates = {b: x for b, x in enumerate(check["removal_losses"]) if x is not None}
    assert sorted(estimates) == list(range(1, 9))  # every unprotected block
    for block, estimate in estimates.items():
        assert estimate == pytest.approx(base + taylor[block], rel=1e-9)
    first = check["steps"][0]
    assert len(measured) == first["measured"] >= 1
    # measured in the order of their estimates, each the lowest bound when measured
    assert [b for b, _ in measured] == sorted(estimates, key=lambda b: (estimates[b], b))[: len(measured)]
    losses = dict(measured)
    assert first["block"] == min(losses, key=lambda b: (losses[b], b))
    assert first["loss"] == pytest.approx(calibration_nll(model, first_tokens(batches, config.loss_tokens), [first["block"]]), rel=1e-6)
    if len(losses) < len(estimates):  # the search stopped: no unmeasured estimate is lower
        assert first["loss"] <= min(estimates[b] for b in estimates if b not in losses)
    with pytest.raises(ConfigError, match="needs `gradient_score: taylor`"):
        SGLPConfig(drop=2, loss_screen="taylor", gradient_score="fisher")


def test_the_plan_and_card_carry_the_calibration_tokens_digest():
    """The same text gives the same digest (sha256 of every token and mask, by an independent
    hash here), other text another, and the card shows it: what tells two runs whose seeded
    samples came out otherwise apart."""
    import hashlib

    from sglp_llm.output.modelcard import render_model_card

    model = tiny_model("llama", num_layers=6)
    config = SGLPConfig(drop=2, **CONFIG)
    plan = analyze(model, _batches(), config, progress=False)
    expected = hashlib.sha256()
    for batch in _batches():
        for name in ("attention_mask", "input_ids"):
            tensor = batch[name]
            expected.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode() + tensor.numpy().tobytes())
    assert plan.extra["calibration_sha256"] == expected.hexdigest()
    assert analyze(model, _batches(), config, progress=False).extra["calibration_sha256"] == expected.hexdigest()
    other = [tiny_batch(batch_size=4, seq_len=16, seed=s) for s in (0, 1, 5)]
    assert analyze(model, other, config, progress=False).extra["calibration_sha256"] != expected.hexdigest()
    assert f"`{expected.hexdigest()}`" in render_model_card(plan, base_model="tiny")
