"""The choice's stability: the same analysis on each half of the calibration sequences, on a tiny
model built so that each half has a block that does nothing on its tokens (a planted choice)."""

from __future__ import annotations

import pytest
import torch

from sglp_llm import SGLPConfig, analyze
from sglp_llm.data import CalibrationSet
from sglp_llm.output.modelcard import render_model_card
from sglp_llm.stability import calibration_halves, choice_stability, stability_warning
from tiny_models import VOCAB, tiny_batch, tiny_model

HALF = 16  # hidden coordinates 0-15 carry tokens of the low half of the vocabulary, 16-31 the high half


def _two_subspace_model(idle_on: dict[int, set[int]]):
    """A tiny llama whose residual stream keeps two subspaces apart: low tokens live in
    coordinates 0-15, high tokens in 16-31, and every block reads and writes each subspace on its
    own (heads, key/value heads and MLP units split in halves). Block b's part for subspace s is
    zeroed for each s in `idle_on[b]`: b does exactly nothing to text of those tokens."""
    model = tiny_model("llama", num_layers=8)
    hidden = model.config.hidden_size
    side = lambda n: (torch.arange(n) >= n // 2).long()  # noqa: E731  halves of heads and units
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        low = torch.arange(VOCAB) < VOCAB // 2
        embed[low, HALF:] = 0
        embed[~low, :HALF] = 0
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                out_side = side(linear.weight.shape[0])
                linear.weight *= (out_side[:, None] == side(hidden)[None, :])
            for linear, in_size in ((attn.o_proj, attn.o_proj.weight.shape[1]), (mlp.down_proj, mlp.down_proj.weight.shape[1])):
                linear.weight *= (side(hidden)[:, None] == side(in_size)[None, :])
            for s in idle_on.get(index, ()):
                for linear in (attn.o_proj, mlp.down_proj):
                    linear.weight[side(hidden) == s] = 0
    return model


def _calibration(first_low: bool, second_low: bool) -> list[dict[str, torch.Tensor]]:
    """4 batches of 2 sequences; the first two batches' tokens from one half of the vocabulary,
    the last two's from the other (low: ids 3 to VOCAB/2 - 1)."""
    batches = []
    for n, low in enumerate([first_low, first_low, second_low, second_low]):
        batch = tiny_batch(batch_size=2, seq_len=16, seed=n)
        ids = 3 + batch["input_ids"] % (VOCAB // 2 - 3)
        batch["input_ids"] = ids if low else ids + VOCAB // 2 - 3
        batches.append(batch)
    return batches


CONFIG = SGLPConfig(drop=1, loss_objective="kl", loss_tokens=64, cka_minibatch_tokens=16)


def test_a_planted_unstable_choice_is_reported_and_warned_about():
    """Block 5 does nothing on low tokens and block 2 nothing on high ones: the first half (low
    text) can drop 5 at no cost, the second (high text) 2; they agree on nothing."""
    model = _two_subspace_model({5: {0}, 2: {1}})
    plan = analyze(model, _calibration(True, False), CONFIG, progress=False)
    stability = plan.extra["stability"]
    assert stability["halves"] == [[5], [2]]
    assert stability["agreement"] == 0.0
    assert stability["half_tokens"] == [64, 64]
    assert sorted(stability["agreement_with_choice"]) == [0.0, 1.0]
    assert plan.dropped in ([5], [2])
    warning = stability_warning(stability)
    assert "drop [5] and [2], agreeing on 0 of 1 blocks" in warning and "--n-samples" in warning
    assert "stability: UNSTABLE" in plan.summary()
    assert "stability: UNSTABLE" in render_model_card(plan, base_model="tiny")


def test_a_planted_stable_choice_agrees():
    """Block 5 does nothing on either kind of text: both halves drop it."""
    model = _two_subspace_model({5: {0, 1}})
    plan = analyze(model, _calibration(True, False), CONFIG.replace(drop=1), progress=False)
    assert plan.dropped == [5]
    assert plan.extra["stability"]["halves"] == [[5], [5]]
    assert plan.extra["stability"]["agreement"] == 1.0
    assert stability_warning(plan.extra["stability"]) is None
    assert "stability: stable" in plan.summary()


@pytest.mark.parametrize("loss_tokens, reused", [(40, True), (60, False)])
def test_each_half_is_the_analysis_of_that_half_alone(loss_tokens, reused):
    """The halves' choices equal separate analyses of the first and the last sequences (the NLL
    loss check, where a random model's choice is anybody's guess), also where the first half's is
    the whole's choice, not made again: 40 loss tokens lie in its 4 sequences, 60 do not."""
    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=3, seq_len=12, seed=s) for s in range(3)]  # 9 sequences: 4 and 5
    config = SGLPConfig(drop=2, loss_tokens=loss_tokens, cka_minibatch_tokens=16)
    plan = analyze(model, batches, config, progress=False)
    alone = config.replace(stability_check=False)
    rows = torch.cat([b["input_ids"] for b in batches])
    first = analyze(model, [{"input_ids": rows[:4], "attention_mask": torch.ones_like(rows[:4])}], alone, progress=False)
    second = analyze(model, [{"input_ids": rows[4:], "attention_mask": torch.ones_like(rows[4:])}], alone, progress=False)
    assert plan.extra["stability"]["halves"] == [first.dropped, second.dropped]
    assert plan.extra["stability"]["first_half_is_choice"] is reused
    assert "stability" not in first.extra
    assert plan.timings["stability_s"] > 0 and "stability_s" not in first.timings


def test_halves_split_a_batch_across_the_middle_and_keep_every_row():
    batches = [tiny_batch(batch_size=3, seq_len=6, seed=s, pad_last=2 * (s == 1)) for s in range(2)]
    calibration = CalibrationSet(batches=batches, n_tokens=34, source="test", n_samples=6, seq_len=6)
    first, second = calibration_halves(calibration)
    assert [len(b["input_ids"]) for b in first.batches] == [3]
    assert [len(b["input_ids"]) for b in second.batches] == [3]
    assert (first.n_tokens, second.n_tokens, first.n_samples) == (18, 16, 3)
    odd = CalibrationSet(batches=batches[:1], n_tokens=18, source="test", n_samples=3, seq_len=6)
    a, b = calibration_halves(odd)
    assert torch.equal(torch.cat([a.batches[0]["input_ids"], b.batches[0]["input_ids"]]), batches[0]["input_ids"])
    assert [len(x.batches[0]["input_ids"]) for x in (a, b)] == [1, 2]
    one = CalibrationSet(batches=[{k: v[:1] for k, v in batches[0].items()}], n_tokens=6, source="t", n_samples=1, seq_len=6)
    assert calibration_halves(one) is None
    assert choice_stability(one, [1], lambda half: pytest.fail("nothing to split"))["agreement"] is None


def test_only_a_choice_read_from_the_first_half_alone_is_taken_as_its_choice():
    """The first half's analysis is skipped only when the choice read no sequence beyond it: a
    loss check over the whole stack reads its loss tokens (and held-back ones when it confirms);
    one within the groups or with a gradient score reads statistics of every sequence."""
    from sglp_llm.selection.loss_check import sequences_read

    batches = [tiny_batch(batch_size=2, seq_len=12, seed=s) for s in range(4)]  # 8 sequences of 12 tokens
    calibration = CalibrationSet(batches=batches, n_tokens=96, source="test", n_samples=8, seq_len=12)
    base = SGLPConfig(drop=1, loss_tokens=30)
    assert sequences_read(base, batches) == 3
    assert sequences_read(base.replace(loss_confirm=2), batches) == 6
    assert sequences_read(base.replace(groups=True), batches) is None
    assert sequences_read(base.replace(loss_candidates=2), batches) is None
    assert sequences_read(base.replace(method="block-influence"), batches) is None
    made = []
    choose = lambda half: made.append(half.n_samples) or [2]  # noqa: E731
    record = choice_stability(calibration, [1], choose, lambda half: half.n_samples >= 3)
    assert made == [4] and record["halves"] == [[1], [2]] and record["first_half_is_choice"]
    record = choice_stability(calibration, [1], choose, lambda half: half.n_samples >= 6)
    assert made == [4, 4, 4] and record["halves"] == [[2], [2]] and not record["first_half_is_choice"]


@pytest.mark.parametrize("seed, reused", [(2, False), (6, True)])
def test_a_tie_settled_by_block_influence_is_settled_again_on_the_first_half(seed, reused):
    """Near-ties are settled by block influence measured on every sequence, so a first half that
    holds the loss tokens repeats the whole's choice only where its own block influence settles
    each tie alike. Seed 2: it does not (the whole drops [4, 5, 6], the first half alone
    [1, 4, 5]), so the first half is analysed; seed 6: it does, and the whole's choice stands."""
    torch.manual_seed(seed)
    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=3, seq_len=12, seed=10 * seed + s) for s in range(4)]  # 12 sequences: 6 and 6
    config = SGLPConfig(drop=3, loss_tokens=40, cka_minibatch_tokens=16)  # 40 tokens: the first 4 sequences
    plan = analyze(model, batches, config, progress=False)
    assert any("tied" in step for step in plan.extra["loss_check"]["steps"])
    rows = torch.cat([b["input_ids"] for b in batches])
    first = analyze(model, [{"input_ids": rows[:6], "attention_mask": torch.ones_like(rows[:6])}],
                    config.replace(stability_check=False), progress=False)
    assert plan.extra["stability"]["halves"][0] == first.dropped
    assert plan.extra["stability"]["first_half_is_choice"] is reused
    assert (first.dropped == plan.dropped) is reused


def test_ties_are_settled_alike_only_where_the_rule_picks_each_steps_block():
    from sglp_llm.selection.loss_check import tie_choice, ties_settled_alike

    steps = [{"block": 4}, {"block": 5, "tied": [2, 5]}, {"block": 2, "tied": [2, 7]}]
    influence = [0.0, 0.0, 0.3, 0.0, 0.0, 0.5, 0.0, 0.1]
    # step 2: 5 borders the removed 4, so it goes before the lower-influence 2; step 3: neither borders
    assert tie_choice([2, 5], {4}, influence, "run-then-block-influence") == 5
    assert tie_choice([2, 5], {4}, influence, "block-influence") == 2
    assert not ties_settled_alike(steps, influence, "run-then-block-influence")  # step 3: 7 has less influence
    assert ties_settled_alike(steps, [0.0, 0.0, 0.05, 0.0, 0.0, 0.5, 0.0, 0.1], "run-then-block-influence")
    assert not ties_settled_alike(steps, [0.0, 0.0, 0.05, 0.0, 0.0, 0.5, 0.0, 0.1], "block-influence")
    assert ties_settled_alike([{"block": 3}], [], "block-influence")  # no tie: nothing to settle


def test_the_check_can_be_turned_off():
    model = tiny_model("llama", num_layers=6)
    plan = analyze(model, [tiny_batch(batch_size=4, seq_len=12)], SGLPConfig(drop=1, stability_check=False,
                                                                               cka_minibatch_tokens=16), progress=False)
    assert "stability" not in plan.extra and "stability" not in plan.summary()


def test_a_half_too_small_for_the_settings_leaves_the_choice_unchecked():
    """Held-back tokens after 36 search tokens exist in the whole (8 sequences) but not in a half (4)."""
    model = tiny_model("llama", num_layers=6)
    batches = [tiny_batch(batch_size=2, seq_len=12, seed=s) for s in range(4)]
    plan = analyze(model, batches, SGLPConfig(drop=1, loss_confirm=2, loss_tokens=48, cka_minibatch_tokens=16), progress=False)
    assert plan.extra["stability"]["agreement"] is None
    assert "cannot be analysed alike" in plan.extra["stability"]["reason"]
    assert "stability: not measured" in plan.summary()


def test_halves_that_agree_on_half_the_blocks_are_called_partly_stable():
    from sglp_llm.stability import describe_stability

    record = {"halves": [[1, 2], [2, 3]], "half_tokens": [8, 8], "agreement": 0.5, "agreement_with_choice": [1.0, 0.5]}
    assert describe_stability(record).startswith("stability: partly stable;")
    assert stability_warning(record) is None
    assert describe_stability({**record, "agreement": 0.0, "halves": [[1, 2], [3, 4]]}).startswith("stability: UNSTABLE;")


def test_the_halves_analyses_show_their_progress(capfd, monkeypatch):
    """The stability check takes about as long as the choice: with progress on, it says so and its
    analyses show their bars (the loss check's once for the choice, once for each half not reused);
    with progress off, nothing is printed."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tqdm's own switch, where a shell sets it
    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=3, seq_len=12, seed=s) for s in range(3)]
    config = SGLPConfig(drop=2, loss_tokens=60, cka_minibatch_tokens=16)
    analyze(model, batches, config, progress=True)
    printed = capfd.readouterr().err
    assert printed.count("Stability check: the same analysis on the halves") == 1
    assert printed.index("Stability check") > printed.index("SGLP loss check")
    assert printed[printed.index("Stability check"):].count("SGLP loss check") >= 2  # both halves, each bar redrawn
    analyze(model, batches, config, progress=False)
    assert capfd.readouterr().err == ""
