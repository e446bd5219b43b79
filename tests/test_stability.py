"""The choice's stability: the loss check's search on each half of its sequences (the default), or
the whole analysis on each half of the calibration (every other choice); on a tiny model built so
that each half has a block that does nothing on its tokens (a planted choice), and against
searches and analyses made alone on each half."""

from __future__ import annotations

import pytest
import torch

from sglp_llm import SGLPConfig, analyze
from sglp_llm.data import CalibrationSet
from sglp_llm.output.modelcard import render_model_card
from sglp_llm.selection import sglp
from sglp_llm.selection.loss_check import LossPart, loss_search
from sglp_llm.stability import calibration_halves, choice_stability, describe_stability, stability_warning
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


# KL to the original model: a block that does nothing on a half's text costs exactly nothing there
CONFIG = SGLPConfig(drop=1, loss_objective="kl", loss_tokens=128, cka_minibatch_tokens=16)


def test_a_planted_unstable_choice_is_reported_and_warned_about():
    """Block 5 does nothing on low tokens and block 2 nothing on high ones: the first half of the
    loss sequences (low text) can drop 5 at no cost, the second (high text) 2; they agree on nothing."""
    model = _two_subspace_model({5: {0}, 2: {1}})
    plan = analyze(model, _calibration(True, False), CONFIG, progress=False)
    stability = plan.extra["stability"]
    assert stability["halves"] == [[5], [2]] and stability["halves_of"] == "loss sequences"
    assert stability["agreement"] == 0.0
    assert stability["half_tokens"] == [64, 64]
    assert sorted(stability["agreement_with_choice"]) == [0.0, 1.0]
    assert plan.dropped in ([5], [2])
    warning = stability_warning(stability)
    assert "loss check's sequences drop [5] and [2], agreeing on 0 of 1 blocks" in warning and "--loss-tokens" in warning
    assert "stability: UNSTABLE; the loss check's search on each half of its sequences" in plan.summary()
    assert "stability: UNSTABLE" in render_model_card(plan, base_model="tiny")


def test_a_planted_stable_choice_agrees():
    """Block 5 does nothing on either kind of text: both halves drop it."""
    model = _two_subspace_model({5: {0, 1}})
    plan = analyze(model, _calibration(True, False), CONFIG, progress=False)
    assert plan.dropped == [5]
    assert plan.extra["stability"]["halves"] == [[5], [5]]
    assert plan.extra["stability"]["agreement"] == 1.0
    assert stability_warning(plan.extra["stability"]) is None
    assert "stability: stable" in plan.summary()


def _captured_loss_check(monkeypatch):
    """Keeps what analyze hands the loss check, so a test can search again with it."""
    seen = {}
    real = sglp.loss_check

    def capture(context, segments, budgets):
        seen.update(context=context, segments=segments, budgets=budgets)
        return real(context, segments, budgets)

    monkeypatch.setattr(sglp, "loss_check", capture)
    return seen


@pytest.mark.parametrize("seed, vocabulary", [(2, 0), (6, 0), (2, 3)])
def test_each_half_is_the_search_made_alone_on_that_half(monkeypatch, seed, vocabulary):
    """The halves' choices equal the loss check's search run alone, with nothing read back, on
    each half of its sequences (9 in batches of 3: the middle batch is cut, rows 3+1 | 2+3), near
    ties settled by the same block influence, and (vocabulary 3) each batch's head scoring the
    same tokens (5 of the rest sampled); and the check leaves the choice as it was."""
    from sglp_llm.selection import removal

    monkeypatch.setattr(removal, "RESTS_SAMPLED", 5)
    torch.manual_seed(seed)
    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=3, seq_len=12, seed=10 * seed + s) for s in range(4)]
    # 100 tokens: the first 9 sequences
    config = SGLPConfig(drop=3, loss_tokens=100, cka_minibatch_tokens=16, loss_vocabulary=vocabulary)
    seen = _captured_loss_check(monkeypatch)
    plan = analyze(model, batches, config, progress=False)
    unchecked = analyze(model, batches, config.replace(stability_check=False), progress=False)
    assert plan.dropped == unchecked.dropped
    for a, b in zip(plan.extra["loss_check"]["steps"], unchecked.extra["loss_check"]["steps"]):
        assert a["block"] == b["block"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    rows = torch.cat([b["input_ids"] for b in batches])
    first = [{"input_ids": rows[:3], "attention_mask": torch.ones_like(rows[:3])},
             {"input_ids": rows[3:4], "attention_mask": torch.ones_like(rows[3:4])}]
    second = [{"input_ids": rows[4:6], "attention_mask": torch.ones_like(rows[4:6])},
              {"input_ids": rows[6:9], "attention_mask": torch.ones_like(rows[6:9])}]
    context = seen["context"]
    with torch.no_grad():
        alone = [loss_search(context, seen["segments"], seen["budgets"], part)[0]
                 for part in (LossPart(first), LossPart(second, first_batch=2))]  # batch 2 of the cut loss batches
    stability = plan.extra["stability"]
    assert stability["halves"] == alone
    assert stability["half_tokens"] == [48, 60]
    assert stability["reused"] > 0  # what the whole measured on a half was read back
    assert plan.timings["stability_s"] > 0 and "stability_s" not in unchecked.timings


def test_the_halves_run_only_what_the_whole_did_not_measure_on_them(monkeypatch):
    """Counted with hooks: the check costs far less than searching each half anew (where the halves
    follow the whole's path, nothing but the second half's screen runs)."""
    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=2, seq_len=12, seed=s) for s in range(4)]
    config = SGLPConfig(drop=2, loss_tokens=96, cka_minibatch_tokens=16, loss_ties="none")
    positions = [0]
    hook = model.lm_head.register_forward_pre_hook(lambda module, args: positions.__setitem__(0, positions[0] + args[0].shape[:2].numel()))
    seen = _captured_loss_check(monkeypatch)
    checked = analyze(model, batches, config, progress=False)
    with_check, positions[0] = positions[0], 0
    analyze(model, batches, config.replace(stability_check=False), progress=False)
    without, positions[0] = positions[0], 0
    context = seen["context"]
    rows = torch.cat([b["input_ids"] for b in batches])
    for half in (rows[:4], rows[4:]):
        with torch.no_grad():
            loss_search(context, seen["segments"], seen["budgets"], LossPart([{"input_ids": half, "attention_mask": torch.ones_like(half)}]))
    anew = positions[0]
    hook.remove()
    assert checked.extra["stability"]["agreement"] is not None
    assert with_check - without < anew / 2


def test_one_loss_sequence_cannot_be_split():
    model = tiny_model("llama", num_layers=6)
    plan = analyze(model, [tiny_batch(batch_size=4, seq_len=12)], SGLPConfig(drop=1, loss_tokens=10, cka_minibatch_tokens=16),
                   progress=False)
    assert plan.extra["stability"]["agreement"] is None and "--loss-tokens" in plan.extra["stability"]["reason"]
    assert "stability: not measured" in plan.summary()


@pytest.mark.parametrize("method", ["block-influence", "angular"])
def test_another_choice_is_analysed_again_on_each_half_of_the_calibration(method):
    """A peer's choice reads every calibration sequence: the whole analysis is made on each half of
    them, and the halves' choices equal separate analyses of the first and the last sequences."""
    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=3, seq_len=12, seed=s) for s in range(3)]  # 9 sequences: 4 and 5
    config = SGLPConfig(drop=2, method=method, cka_minibatch_tokens=16)
    plan = analyze(model, batches, config, progress=False)
    alone = config.replace(stability_check=False)
    rows = torch.cat([b["input_ids"] for b in batches])
    first = analyze(model, [{"input_ids": rows[:4], "attention_mask": torch.ones_like(rows[:4])}], alone, progress=False)
    second = analyze(model, [{"input_ids": rows[4:], "attention_mask": torch.ones_like(rows[4:])}], alone, progress=False)
    assert plan.extra["stability"]["halves"] == [first.dropped, second.dropped]
    assert plan.extra["stability"]["halves_of"] == "calibration sequences"
    assert "stability" not in first.extra
    assert plan.timings["stability_s"] > 0 and "stability_s" not in first.timings
    assert "the same analysis on each half of the calibration sequences" in plan.summary()


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


def test_the_check_can_be_turned_off():
    model = tiny_model("llama", num_layers=6)
    plan = analyze(model, [tiny_batch(batch_size=4, seq_len=12)], SGLPConfig(drop=1, stability_check=False,
                                                                               cka_minibatch_tokens=16), progress=False)
    assert "stability" not in plan.extra and "stability" not in plan.summary() and "stability_s" not in plan.timings


def test_a_half_too_small_for_the_settings_leaves_the_choice_unchecked():
    """Held-back tokens after 36 search tokens exist in the whole (8 sequences) but not in a half
    (4); a choice confirmed on them is checked by whole analyses of the halves."""
    model = tiny_model("llama", num_layers=6)
    batches = [tiny_batch(batch_size=2, seq_len=12, seed=s) for s in range(4)]
    plan = analyze(model, batches, SGLPConfig(drop=1, loss_confirm=2, loss_tokens=48, cka_minibatch_tokens=16), progress=False)
    assert plan.extra["stability"]["agreement"] is None
    assert "cannot be analysed alike" in plan.extra["stability"]["reason"]
    assert "stability: not measured" in plan.summary()


def test_halves_that_agree_on_half_the_blocks_are_called_partly_stable():
    record = {"halves": [[1, 2], [2, 3]], "half_tokens": [8, 8], "agreement": 0.5, "agreement_with_choice": [1.0, 0.5]}
    assert describe_stability(record).startswith("stability: partly stable;")
    assert stability_warning(record) is None
    assert describe_stability({**record, "agreement": 0.0, "halves": [[1, 2], [3, 4]]}).startswith("stability: UNSTABLE;")


def test_the_halves_searches_show_their_progress(capfd, monkeypatch):
    """With progress on, each half's search shows its bar after the choice's; off, nothing is printed."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tqdm's own switch, where a shell sets it
    model = tiny_model("llama", num_layers=8)
    batches = [tiny_batch(batch_size=3, seq_len=12, seed=s) for s in range(3)]
    config = SGLPConfig(drop=2, loss_tokens=60, cka_minibatch_tokens=16)
    analyze(model, batches, config, progress=True)
    printed = capfd.readouterr().err
    first, second = (printed.index(f"Stability check: {which} half of the loss sequences") for which in ("first", "second"))
    assert printed.index("SGLP loss check") < first < second
    analyze(model, batches, config, progress=False)
    assert capfd.readouterr().err == ""
