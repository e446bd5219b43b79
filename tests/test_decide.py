"""Deciding among SGLP's and peers' choices on held-back calibration tokens (decide_among,
sglp_llm.selection.decide): the decision against a brute force, the plumbing into the plan and its
words, and the refusals."""

from __future__ import annotations

import pytest

from sglp_llm import ConfigError, SGLPConfig, analyze
from sglp_llm.data import skip_samples
from sglp_llm.model.handle import ModelHandle
from sglp_llm.selection.decide import decide, held_back_rest
from sglp_llm.selection.removal import calibration_nll
from tiny_models import tiny_batch, tiny_model

# 6 batches of 2 sequences of 16 tokens: the loss check reads the first 64 tokens (4 sequences),
# the other 8 sequences are held back
CONFIG = dict(n_samples=12, batch_size=2, loss_tokens=64, cka_minibatch_tokens=8, stability_check=False)


def _batches():
    return [tiny_batch(batch_size=2, seq_len=16, seed=s) for s in range(6)]


def test_the_decision_is_the_lowest_held_back_loss_of_a_brute_force():
    model = tiny_model("llama", num_layers=6)
    batches = _batches()
    candidates = {"sglp": [2, 3], "block-influence": [1, 4], "angular": [3, 4], "again": [3, 2]}
    winner, record = decide(ModelHandle.of(model), batches, candidates, loss_tokens=64)
    held_back = skip_samples(batches, 4)  # the 64 tokens are the first 4 sequences
    losses = {name: calibration_nll(model, held_back, blocks) for name, blocks in candidates.items()}
    assert winner == min(candidates, key=lambda n: (losses[n], list(candidates).index(n)))
    assert record["chosen"] == winner and record["held_back_tokens"] == 8 * 16
    for name, blocks in candidates.items():
        assert record["candidates"][name] == {"dropped": sorted(blocks), "held_back_loss": pytest.approx(losses[name], rel=1e-6)}
    # the same set under two names is one measurement, and a tie goes to the name listed first
    assert record["candidates"]["again"]["held_back_loss"] == record["candidates"]["sglp"]["held_back_loss"]
    assert decide(ModelHandle.of(model), batches, {"b": [2, 3], "a": [3, 2]}, 64)[0] == "b"


def test_an_analysis_decides_among_the_peers_own_choices():
    model = tiny_model("llama", num_layers=6)
    config = SGLPConfig(drop=2, decide_among=["block-influence", "angular"], **CONFIG)
    plan = analyze(model, _batches(), config, progress=False)
    decision = plan.extra["decision"]
    own = analyze(model, _batches(), config.replace(decide_among=[]), progress=False).dropped
    peers = {m: analyze(model, _batches(), config.replace(method=m, decide_among=[]), progress=False).dropped
             for m in ("block-influence", "angular")}
    expected = {"sglp": own, **peers}
    assert {name: c["dropped"] for name, c in decision["candidates"].items()} == expected
    held_back = held_back_rest(_batches(), 64)
    losses = {name: calibration_nll(model, held_back, blocks) for name, blocks in expected.items()}
    assert decision["chosen"] == min(expected, key=lambda n: (losses[n], list(expected).index(n)))
    assert plan.dropped == expected[decision["chosen"]] and plan.kept == [b for b in range(6) if b not in plan.dropped]
    assert plan.timings["decision_s"] > 0
    assert any(line.startswith("decision:") for line in plan.extra["stages"])
    assert all("held-back calibration loss" in why for why in plan.extra["chosen_by"].values())


def test_a_peer_that_wins_gives_the_plan_its_blocks_and_its_words(monkeypatch):
    import sglp_llm.api as api

    model = tiny_model("llama", num_layers=8)
    config = SGLPConfig(drop=2, groups=True, num_segments=2, decide_among=["block-influence"], **CONFIG)

    def peer_wins(handle, batches, candidates, loss_tokens):
        record = {"held_back_tokens": 128, "chosen": "block-influence",
                  "candidates": {name: {"dropped": sorted(b), "held_back_loss": 1.0 if name == "block-influence" else 2.0}
                                 for name, b in candidates.items()}}
        return "block-influence", record

    monkeypatch.setattr(api, "decide", peer_wins)
    plan = analyze(model, _batches(), config, progress=False)
    peer = plan.extra["decision"]["candidates"]["block-influence"]["dropped"]
    assert plan.dropped == peer
    # the groups' counts follow the peer's blocks
    assert plan.keep_per_segment == [len(s) - sum(b in s for b in peer) for s in plan.segments]
    assert all(why.startswith("block-influence's choice") and "taken over SGLP's" in why
               for why in plan.extra["chosen_by"].values())
    assert set(plan.extra["chosen_by"]) == {str(b) for b in peer}


def test_refusals():
    with pytest.raises(ConfigError, match="each peer once"):
        SGLPConfig(drop=1, decide_among=["block-influence", "sglp"])
    with pytest.raises(ConfigError, match="each peer once"):
        SGLPConfig(drop=1, decide_among=["angular", "angular"])
    with pytest.raises(ConfigError, match="method sglp"):
        SGLPConfig(drop=1, method="angular", decide_among=["block-influence"])
    with pytest.raises(ConfigError, match="--n-samples"):
        held_back_rest(_batches(), 6 * 2 * 16)


def test_a_choice_peers_decided_on_is_checked_by_whole_analyses_of_the_halves():
    """The loss check's own check (its search on each half of its sequences) would speak for its
    choice, not for a peer's that won the decision: the whole analysis is made on each half."""
    model = tiny_model("llama", num_layers=6)
    config = SGLPConfig(drop=1, **{**CONFIG, "n_samples": 16, "stability_check": True})
    decided = analyze(model, _batches() * 2, config.replace(decide_among=["angular"]), progress=False)
    plain = analyze(model, _batches() * 2, config, progress=False)
    assert decided.extra["stability"]["halves_of"] == "calibration sequences"
    assert plain.extra["stability"]["halves_of"] == "loss sequences"


def test_halves_too_short_to_decide_leave_the_choice_standing_unchecked():
    model = tiny_model("llama", num_layers=6)
    # 8 sequences: the whole holds 4 after the loss check's; each half holds none
    config = SGLPConfig(drop=2, decide_among=["angular"], **{**CONFIG, "n_samples": 8, "stability_check": True})
    plan = analyze(model, _batches()[:4], config, progress=False)
    assert plan.extra["decision"]["held_back_tokens"] == 4 * 16
    assert plan.extra["stability"]["agreement"] is None and "decide_among" in plan.extra["stability"]["reason"]
