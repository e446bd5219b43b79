"""The loss check's near-ties (loss_ties): removals whose losses the calibration sequences cannot
tell apart are settled by block influence; checked against a brute force of whole-network passes,
one sequence at a time, and block influence computed by hand."""

from __future__ import annotations

import pytest
import torch

from sglp_llm import ConfigError, SGLPConfig, analyze
from sglp_llm.data import first_tokens
from sglp_llm.selection.removal import calibration_nll
from tiny_models import tiny_batch, tiny_model

BATCHES = [tiny_batch(batch_size=2, seq_len=12, seed=s, pad_last=3 * (s == 1)) for s in range(4)]
CONFIG = SGLPConfig(drop=3, loss_ties="block-influence", loss_tokens=48, cka_minibatch_tokens=16, stability_check=False)


def _rows(batches):
    return [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def _block_influence(model, batches) -> list[float]:
    """1 − the mean cosine between each block's input and output over the non-padding tokens."""
    cos_sum, count = [0.0] * len(model.model.layers), 0
    hooks = [layer.register_forward_hook(
        lambda m, args, kwargs, out, i=i: cos_sum.__setitem__(i, cos_sum[i] + torch.nn.functional.cosine_similarity(
            args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out, dim=-1)[mask].sum().item()),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"].bool()
            model(**batch)
            count += int(mask.sum())
    for hook in hooks:
        hook.remove()
    return [1 - c / count for c in cos_sum]


def _tie_settled_by_brute_force(model, search, removed, free, influence, rule="block-influence", errors=1.0):
    """The step's lowest-loss block, the blocks within `errors` standard errors of its per-sequence
    increase, and the lowest-influence block among them (with the run rule: among those next to a
    removed block, when any is)."""
    loss = {b: calibration_nll(model, search, removed + [b]) for b in free}
    best = min(free, key=lambda b: (loss[b], b))
    rows = _rows(search)
    increase = torch.tensor([calibration_nll(model, [r], removed + [best]) - calibration_nll(model, [r], removed) for r in rows])
    margin = errors * (increase.std() / len(rows) ** 0.5).item()
    tied = sorted(b for b in free if loss[b] <= loss[best] + margin)
    bordering = [b for b in tied if b - 1 in removed or b + 1 in removed] if rule == "run-then-block-influence" else []
    return best, tied, min(bordering or tied, key=lambda b: (influence[b], b))


def _exact_run_rule_plan(family, seed, **settings):
    """A tiny model's plan with every candidate measured (no lazy bound, no screen) under the run
    rule and `settings`: (model, plan, the search tokens, block influence)."""
    model = tiny_model(family, num_layers=8, seed=seed)
    config = CONFIG.replace(loss_lazy=False, loss_screen_samples=0, loss_ties="run-then-block-influence")
    plan = analyze(model, BATCHES, config.replace(**settings), progress=False)
    return model, plan, first_tokens(BATCHES, 48), _block_influence(model, BATCHES)


# models where a tie changes the choice (and, for the run rule, where it chooses unlike block influence alone)
@pytest.mark.parametrize("family,seed,rule", [
    ("llama", 3, "block-influence"), ("qwen2", 1, "block-influence"),
    ("llama", 4, "run-then-block-influence"), ("gemma3_text", 3, "run-then-block-influence"),
])
def test_near_ties_are_settled_by_block_influence_as_brute_force_settles_them(family, seed, rule):
    """Every candidate measured (no lazy bound, no screen): the exact rule."""
    model = tiny_model(family, num_layers=8, seed=seed)
    plan = analyze(model, BATCHES, CONFIG.replace(loss_lazy=False, loss_screen_samples=0, loss_ties=rule), progress=False)
    search = first_tokens(BATCHES, 48)
    influence = _block_influence(model, BATCHES)
    removed: list[int] = []
    settled = 0
    for step in plan.extra["loss_check"]["steps"]:
        best, tied, chosen = _tie_settled_by_brute_force(model, search, removed, [b for b in range(8) if b not in plan.extra["protected"] and b not in removed],
                                                         influence, rule)
        assert step["block"] == chosen
        if len(tied) > 1:
            assert (step["tied"], step["lowest_loss"]) == (tied, best)
            assert step["tie_margin"] > 0
            settled += chosen != best
        else:
            assert "tied" not in step
        removed.append(chosen)
    assert plan.dropped == sorted(removed)
    assert settled, "no step here had a tie that block influence settled: the test would not see the rule"
    if rule != "block-influence":
        assert plan.dropped != analyze(model, BATCHES, CONFIG.replace(loss_lazy=False, loss_screen_samples=0), progress=False).dropped


@pytest.mark.parametrize("family,seed", [("llama", 0), ("qwen2", 1)])
def test_wider_near_ties_are_settled_as_brute_force_settles_them(family, seed):
    """loss_tie_errors 2: a tie spans two standard errors (every candidate measured), and here that
    changes the choice from the one-error rule's."""
    model, plan, search, influence = _exact_run_rule_plan(family, seed, loss_tie_errors=2.0)
    removed: list[int] = []
    for step in plan.extra["loss_check"]["steps"]:
        best, tied, chosen = _tie_settled_by_brute_force(model, search, removed, [b for b in range(8) if b not in plan.extra["protected"] and b not in removed],
                                                         influence, "run-then-block-influence", errors=2.0)
        assert step["block"] == chosen
        assert step.get("tied", [chosen]) == tied
        removed.append(chosen)
    assert plan.dropped != _exact_run_rule_plan(family, seed)[1].dropped
    # the stages and what chose each tied block name the span
    from sglp_llm.explain import chosen_by, stages

    assert "within 2 standard errors" in " ".join(stages(plan.config, plan.n_tokens))
    settled = [s["block"] for s in plan.extra["loss_check"]["steps"] if "tied" in s]
    assert settled and all(", 2 standard errors, of block" in chosen_by(plan)[b] for b in settled)


@pytest.mark.parametrize("family,seed", [("llama", 3), ("qwen2", 1)])
def test_the_lazy_search_settles_the_ties_its_bounds_let_it_see(family, seed):
    """The lazy search measures fresh only the candidates whose bound may lie within the margin of
    its lowest measured loss, so a tie can be missed where a bound overestimates; what it calls
    tied is within that margin (by whole-network passes), the margin is the standard error of
    that removal's per-sequence increase, and the tie is settled by the same rule."""
    model = tiny_model(family, num_layers=8, seed=seed)
    plan = analyze(model, BATCHES, CONFIG, progress=False)
    search, rows = first_tokens(BATCHES, 48), _rows(first_tokens(BATCHES, 48))
    influence = _block_influence(model, BATCHES)
    removed: list[int] = []
    ties = 0
    for step in plan.extra["loss_check"]["steps"]:
        if "tied" in step:
            ties += 1
            lowest = step["lowest_loss"]
            increase = torch.tensor([calibration_nll(model, [r], removed + [lowest]) - calibration_nll(model, [r], removed) for r in rows])
            assert step["tie_margin"] == pytest.approx((increase.std() / len(rows) ** 0.5).item(), rel=1e-5)
            loss = {b: calibration_nll(model, search, removed + [b]) for b in step["tied"]}
            assert all(loss[b] <= loss[lowest] + step["tie_margin"] + 1e-6 for b in step["tied"])
            assert step["block"] == min(step["tied"], key=lambda b: (influence[b], b))
        removed.append(step["block"])
    assert ties and plan.dropped == sorted(removed)


def _risk_settled_by_brute_force(model, search, removed, free, influence, risk):
    """The step's choice when each candidate counts as its loss plus `risk` standard errors of its
    per-sequence increase: the lowest such value, the blocks within one standard error (of that
    block's increase) of it, the run rule among them."""
    rows = _rows(search)
    before = torch.tensor([calibration_nll(model, [r], removed) for r in rows])

    def error(b):
        increase = torch.tensor([calibration_nll(model, [r], removed + [b]) for r in rows]) - before
        return (increase.std() / len(rows) ** 0.5).item()

    errors = {b: error(b) for b in free}
    value = {b: calibration_nll(model, search, removed + [b]) + risk * errors[b] for b in free}
    best = min(free, key=lambda b: (value[b], b))
    tied = sorted(b for b in free if value[b] <= value[best] + errors[best])
    bordering = [b for b in tied if b - 1 in removed or b + 1 in removed]
    return value, min(bordering or tied, key=lambda b: (influence[b], b))


@pytest.mark.parametrize("family,seed", [("llama", 0), ("qwen2", 1)])
def test_the_risk_adjusted_choice_is_the_brute_force_one(family, seed):
    """loss_risk 1: every candidate measured, each step takes what a brute force of whole-network
    passes, one sequence at a time, takes; and somewhere that is not the loss alone's choice."""
    model, plan, search, influence = _exact_run_rule_plan(family, seed, loss_risk=1.0)
    removed: list[int] = []
    for step in plan.extra["loss_check"]["steps"]:
        value, chosen = _risk_settled_by_brute_force(model, search, removed, [b for b in range(8) if b not in plan.extra["protected"] and b not in removed],
                                                     influence, 1.0)
        assert step["block"] == chosen
        for block, adjusted in step["risk_adjusted"].items():
            assert adjusted == pytest.approx(value[int(block)], rel=1e-5)
        removed.append(chosen)
    assert plan.dropped == sorted(removed)
    assert plan.dropped != _exact_run_rule_plan(family, seed)[1].dropped


def test_risk_needs_the_greedy_nll_check_with_ties():
    for settings in ({"loss_ties": "none"}, {"loss_objective": "kl"}, {"loss_confirm": 3}):
        with pytest.raises(ConfigError, match="`loss_risk` ranks the greedy NLL loss check"):
            CONFIG.replace(loss_risk=1.0, **settings)
    with pytest.raises(ConfigError, match="`loss_risk` must be a non-negative number"):
        CONFIG.replace(loss_risk=-1)


def test_without_ties_the_lowest_loss_goes():
    model = tiny_model("llama", num_layers=8)
    plan = analyze(model, BATCHES, CONFIG.replace(loss_ties="none", loss_lazy=False, loss_screen_samples=0), progress=False)
    search = first_tokens(BATCHES, 48)
    removed: list[int] = []
    for step in plan.extra["loss_check"]["steps"]:
        free = [b for b in range(8) if b not in plan.extra["protected"] and b not in removed]
        removed.append(min(free, key=lambda b: (calibration_nll(model, search, removed + [b]), b)))
        assert step["block"] == removed[-1] and "tied" not in step


@pytest.mark.parametrize("settings", [{"loss_objective": "kl"}, {"loss_confirm": 3}])
def test_ties_apply_to_the_greedy_nll_check_only(settings):
    """The KL objective keeps no per-sequence losses and a held-back decision settles the step
    itself: there the setting does not apply, and nothing says it did."""
    model = tiny_model("llama", num_layers=8, seed=3)
    config = CONFIG.replace(**settings)
    assert not config.settles_ties and CONFIG.settles_ties
    plan = analyze(model, BATCHES, config.replace(loss_tokens=36), progress=False)
    assert not any("tied" in step for step in plan.extra["loss_check"]["steps"])
    assert "standard error" not in plan.summary()
    with pytest.raises(ConfigError, match="`loss_ties` must be one of"):
        CONFIG.replace(loss_ties="angular")


def test_a_block_chosen_on_a_tie_says_so_in_the_summary_and_card():
    from sglp_llm.explain import chosen_by, stages
    from sglp_llm.output.modelcard import render_model_card

    plan = analyze(tiny_model("llama", num_layers=8, seed=3), BATCHES, CONFIG.replace(loss_lazy=False, loss_screen_samples=0),
                   progress=False)
    summary, card = plan.summary(), render_model_card(plan, base_model="tiny")
    assert "within one standard error" in " ".join(stages(plan.config, plan.n_tokens))
    settled = [s for s in plan.extra["loss_check"]["steps"] if "tied" in s]
    assert settled
    for step in settled:
        why = chosen_by(plan)[step["block"]]
        assert f"tied with {[b for b in step['tied'] if b != step['block']]}" in why
        assert f"block {step['lowest_loss']}'s loss" in why
        assert f"block {step['block']}: {why}" in summary and f"- block {step['block']}: {why}" in card
    without = analyze(tiny_model("llama", num_layers=8, seed=3), BATCHES, CONFIG.replace(loss_ties="none"), progress=False)
    assert "standard error" not in without.summary() and "tied" not in without.summary()
