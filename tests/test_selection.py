"""The one selection interface: every method and scoring mode is a registered selection whose
documented settings exist, and every output says which stages ran and what chose each block."""

from __future__ import annotations

import dataclasses

import pytest

from sglp_llm import SGLPConfig, analyze
from sglp_llm.config import METHODS, SCORING_MODES
from sglp_llm.explain import chosen_by, stages
from sglp_llm.output.modelcard import render_model_card
from sglp_llm.selection.registry import SELECTIONS, selection_name, selector_for
from tiny_models import tiny_batch, tiny_model

CONFIG = dict(cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4, verify=False)


def _batches():
    return [tiny_batch(batch_size=4, seq_len=16, seed=s) for s in range(2)]


def test_every_method_and_scoring_mode_is_a_registered_selection_with_real_settings():
    configs = [SGLPConfig(drop=1, method=m) for m in METHODS if m != "sglp"]
    configs += [SGLPConfig(drop=1, scoring=s) for s in SCORING_MODES]
    fields = {f.name for f in dataclasses.fields(SGLPConfig)}
    for config in configs:
        selector = selector_for(config)
        assert SELECTIONS[selection_name(config)] is selector
        assert set(selector.settings) <= fields, selection_name(config)
    assert len({selection_name(c) for c in configs}) == len(configs) == len(SELECTIONS)


@pytest.mark.parametrize("settings, expected", [
    ({"scoring": "loss", "loss_candidates": 2, "gradient_score": "taylor", "groups": True}, ["similarity", "groups: Fisher", "gradient score, from one backward: the Taylor",
                                                 "choice: one removal at a time", "the 2 lowest-scored blocks of each group"]),
    ({"scoring": "loss", "loss_candidates": "all", "groups": True},
     ["gradient score: none (no backward runs)", "among every block of its group",
      "screen on 1 calibration sequence makes promising (its estimates lowered by 1 expected error)"]),
    ({"loss_screen_errors": 0, "loss_screen_samples": 2}, ["screen on 2 calibration sequences makes promising;"]),
    ({"loss_risk": 1.5}, ["counted with 1.5 standard errors of its increase added"]),
    # the default: no groups, so the CKA only feeds the report
    ({}, ["for the report and heatmap only", "groups: none", "no backward runs", "among every unprotected block",
          "(2048 tokens, the NLL estimated", "32 likeliest tokens per position", "(its estimates lowered by 1 expected error)"]),
    ({"loss_vocabulary": 0}, ["(2048 tokens), among"]),
    ({"loss_vocabulary": None}, ["32 likeliest tokens per position", "over 16384 tokens or more, else from the whole vocabulary"]),
    ({"loss_vocabulary": 8}, ["each sequence's 8 likeliest tokens per position"]),
    ({"scoring": "block", "gradient_score": "fisher", "num_segments": 1}, ["groups: none", "second moment", "no loss check"]),
    ({"method": "angular"}, ["angular distance", "no CKA groups, no gradient score"]),
])
def test_stages_name_what_runs(settings, expected):
    text = "\n".join(stages(SGLPConfig(drop=1, **settings).to_dict()))
    for part in expected:
        assert part in text
    if not SGLPConfig(drop=1, **settings).needs_backward:  # no backward: no score named
        assert "Taylor" not in text and "GradNorm" not in text


@pytest.mark.parametrize("settings", [
    {"scoring": "loss", "loss_candidates": 2, "gradient_score": "taylor"},
    {"scoring": "block"},
    {"method": "sleb"},
])
def test_every_dropped_block_says_what_chose_it_in_plan_summary_and_card(settings):
    model = tiny_model("llama", num_layers=8)
    plan = analyze(model, _batches(), SGLPConfig(drop=3, **settings, **CONFIG), progress=False)
    reasons = chosen_by(plan)
    assert sorted(reasons) == plan.dropped
    assert plan.extra["stages"] == stages(plan.config, plan.n_tokens)
    assert plan.extra["chosen_by"] == {str(b): why for b, why in reasons.items()}
    summary, card = plan.summary(), render_model_card(plan, base_model="tiny")
    for block, why in reasons.items():
        assert f"block {block}: {why}" in summary and f"- block {block}: {why}" in card
    for stage in plan.extra["stages"]:
        assert stage in summary and f"- {stage}" in card
    if settings.get("scoring") == "loss":
        # the calibration (128 tokens) is shorter than loss_tokens: the stages say what was read
        assert plan.n_tokens == 128 < plan.config["loss_tokens"]
        assert "(128 tokens)" in summary and f"({plan.config['loss_tokens']} tokens)" not in summary
        steps = plan.extra["loss_check"]["steps"]
        for n, step in enumerate(steps):
            assert f"loss check removal {n + 1}, calibration loss {step['loss']:.4f}" in reasons[step["block"]]
            assert "by taylor" in reasons[step["block"]]
    if settings.get("scoring") == "block":  # the d lowest-scored droppable blocks of each group
        for segment in plan.segments:
            gone = [b for b in segment if b in plan.dropped]
            ranks = sorted(int(reasons[b].split("rank ")[1].split(" of")[0]) for b in gone)
            assert ranks == list(range(1, len(gone) + 1))
        assert "loss check" not in " ".join(reasons.values()) and "by gradnorm" in " ".join(reasons.values())


def test_cli_help_describes_the_default_run_from_the_same_source():
    from sglp_llm.cli import build_parser

    description = build_parser().description
    for stage in stages(SGLPConfig(drop=1).to_dict()):
        assert stage in description
    # the default runs no backward, so the help names no gradient score as used
    assert "gradient score: none (no backward runs)" in description and "GradNorm" not in description


def test_default_loss_check_without_groups_is_the_loss_check_over_one_group_of_every_block():
    """Leaving the groups out (the default) must choose what the grouped rule chooses when one
    group holds every block, and no output may name a group."""
    model = tiny_model("llama", num_layers=8)
    plan = analyze(model, _batches(), SGLPConfig(drop=3, **CONFIG), progress=False)
    grouped = analyze(model, _batches(), SGLPConfig(drop=3, groups=True, num_segments=1, **CONFIG), progress=False)
    assert plan.dropped == grouped.dropped and plan.extra["loss_check"] == grouped.extra["loss_check"]
    assert plan.segments == [list(range(8))] and "k" not in plan.extra and "segmentation_s" not in plan.timings
    assert grouped.extra["k"] == 1
    assert not any("group" in why for why in chosen_by(plan).values())
    assert all("group 0-7" in why for why in chosen_by(grouped).values())
