"""SGLPConfig validation messages and round trips through disk."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sglp_llm.config import ConfigError, SGLPConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of `drop`"),
        ({"drop": 2, "ratio": 0.1}, "exactly one of `drop`"),
        ({"drop": 0}, "`drop` must be a positive integer"),
        ({"ratio": 1.5}, "strictly between 0 and 1"),
        ({"drop": 2, "method": "shortgpt"}, r"`method` must be one of \('sglp', 'block-influence', 'angular', 'last', 'random', 'sleb'\), got 'shortgpt'"),
        ({"drop": 2, "seq_len": 0}, "`seq_len` must be a positive integer"),
        ({"drop": 2, "cka_minibatch_tokens": 3}, "at least 4 tokens"),
        ({"drop": 2, "cka_dtype": "float16"}, "`cka_dtype` must be one of"),
        ({"drop": 2, "segment_feature": "cols"}, "`segment_feature` must be one of"),
        ({"drop": 2, "scoring": "magic"}, "`scoring` must be one of"),
        ({"drop": 2, "groups": True, "num_segments": 0}, "`num_segments` must be a positive integer"),
        # group settings without the groups would silently do nothing
        ({"drop": 2, "num_segments": 3}, r"num_segments: 3 shapes the Fisher groups, .* add `groups: true`"),
        ({"drop": 2, "allocation": "size"}, r"allocation: 'size' shapes the Fisher groups"),
        ({"drop": 2, "scoring": "block", "groups": False}, r"`scoring: block` chooses the blocks each Fisher group gives up"),
        ({"drop": 2, "groups": "yes"}, r"`groups` must be true, false or unset"),
        ({"drop": 2, "sleb_batches": 0}, "`sleb_batches` must be a positive integer or unset, got 0"),
        ({"drop": 2, "loss_screen_samples": -1}, "`loss_screen_samples` must be a non-negative integer, got -1"),
        ({"drop": 2, "loss_screen_errors": -0.5}, "`loss_screen_errors` must be a non-negative number"),
        ({"drop": 2, "loss_screen_errors": True}, "`loss_screen_errors` must be a non-negative number"),
        ({"drop": 2, "loss_positions": 0}, r"`loss_positions` is the share of each window's positions the loss check scores, in \(0, 1\]; got 0"),
        ({"drop": 2, "loss_positions": 1.5}, r"in \(0, 1\]; got 1.5"),
        ({"drop": 2, "loss_vocabulary": -1}, r"`loss_vocabulary` is how many of each position's likeliest tokens .* got -1"),
        ({"drop": 2, "loss_vocabulary": 8, "loss_objective": "kl"}, r"narrows the NLL's head; the KL objective"),
        ({"drop": 2, "loss_bound": "tight"}, r"`loss_bound` must be one of \('stale', 'marginal', 'local'\), got 'tight'"),
        ({"drop": 2, "protect_first": -1}, "`protect_first` must be a non-negative"),
        ({"drop": 2, "auto_k": "knee"}, "`auto_k` must be one of"),
        ({"drop": 2, "allocation": "equal"}, "`allocation` must be one of"),
        ({"drop": 2, "min_segment_size": 0}, "`min_segment_size` must be a positive integer"),
        ({"drop": 2, "loss_candidates": 0}, "`loss_candidates` must be a positive integer"),
        ({"drop": 2, "loss_candidates": "every"}, r"`loss_candidates` must be .* or \"all\", got 'every'"),
    ],
)
def test_invalid_settings_are_explained(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SGLPConfig(**kwargs)


def test_resolve_drop():
    assert SGLPConfig(ratio=0.25).resolve_drop(30) == 8
    assert SGLPConfig(drop=5).resolve_drop(30) == 5
    with pytest.raises(ConfigError, match="rounds to 0 blocks"):
        SGLPConfig(ratio=0.01).resolve_drop(8)
    with pytest.raises(ConfigError, match="Cannot drop 7 of 8 blocks: at most 5 can go"):
        SGLPConfig(drop=7).resolve_drop(8)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_through_disk(tmp_path, suffix):
    config = SGLPConfig(ratio=0.3, method="angular", dataset="data.jsonl", seq_len=64, scoring="subset", extra={"note": "x"})
    path = tmp_path / f"config{suffix}"
    config.save(path)
    assert SGLPConfig.load(path) == config
    config.save_pretrained(tmp_path)
    assert SGLPConfig.from_pretrained(tmp_path) == config


def test_recipe_section_and_unknown_keys(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: some/model\nsglp:\n  drop: 3\n  seq_len: 128\n")
    assert SGLPConfig.load(path) == SGLPConfig(drop=3, seq_len=128)
    path.write_text("drop: 3\nsequence_length: 128\n")
    with pytest.raises(ConfigError, match=r"Unknown setting\(s\) \['sequence_length'\]"):
        SGLPConfig.load(path)
    path.write_text("drop: [3\n")
    with pytest.raises(ConfigError, match="Could not parse"):
        SGLPConfig.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        SGLPConfig.load(tmp_path / "missing.yaml")


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("drop: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="Could not parse"):
        SGLPConfig.load(path)


def test_replace_switches_between_drop_and_ratio():
    config = SGLPConfig(ratio=0.2)
    assert config.replace(drop=4) == SGLPConfig(drop=4)
    assert config.replace(drop=4).replace(ratio=0.5) == SGLPConfig(ratio=0.5)


def test_automatic_allocation_follows_the_scoring_mode():
    assert SGLPConfig(drop=1).drop_allocation == "loss"
    assert SGLPConfig(drop=1, scoring="block").drop_allocation == "size"
    assert SGLPConfig(drop=1, scoring="block", allocation="redundancy").drop_allocation == "redundancy"
    with pytest.raises(ConfigError, match="needs `scoring: loss`"):
        SGLPConfig(drop=1, scoring="block", allocation="loss")


def test_every_setting_has_one_place_top_or_one_section():
    fields = [f.name for f in dataclasses.fields(SGLPConfig)]
    placed = [name for names in SGLPConfig.SECTIONS.values() for name in names]
    assert sorted(placed) == sorted(set(placed)) and set(placed) <= set(fields)
    assert [name for name in fields if name not in placed] == ["drop", "ratio", "method", "extra"]


def test_saved_settings_are_grouped_in_sections_and_load_back(tmp_path):
    config = SGLPConfig(drop=3, seq_len=128, loss_bound="stale", offload="sequential", verify=False)
    for name in ("config.json", "config.yaml"):
        config.save(tmp_path / name)
        assert SGLPConfig.load(tmp_path / name) == config
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["drop"] == 3 and saved["calibration"]["seq_len"] == 128
    assert saved["research"]["loss_bound"] == "stale" and saved["memory"]["offload"] == "sequential"
    assert "seq_len" not in saved and saved["verification"] == {"verify": False, "stability_check": True}


def test_flat_and_sectioned_settings_give_the_same_config_and_misplaced_ones_are_refused():
    flat = {"drop": 2, "seq_len": 64, "loss_tokens": 512, "cka_skip_sinks": True}
    sectioned = {"drop": 2, "calibration": {"seq_len": 64}, "loss_check": {"loss_tokens": 512},
                 "research": {"cka_skip_sinks": True}}
    mixed = {"drop": 2, "seq_len": 64, "loss_check": {"loss_tokens": 512}, "cka_skip_sinks": True}
    assert SGLPConfig.from_dict(flat) == SGLPConfig.from_dict(sectioned) == SGLPConfig.from_dict(mixed)
    with pytest.raises(ConfigError, match=r"\['seq_len'\] do not belong in section 'loss_check'"):
        SGLPConfig.from_dict({"drop": 2, "loss_check": {"seq_len": 64}})
    with pytest.raises(ConfigError, match="given both in section 'calibration' and outside it"):
        SGLPConfig.from_dict({"drop": 2, "seq_len": 64, "calibration": {"seq_len": 128}})
    with pytest.raises(ConfigError, match="Section 'memory' must be a mapping"):
        SGLPConfig.from_dict({"drop": 2, "memory": "sequential"})
