"""Every shipped recipe parses into valid configs that fit its model's depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sglp_llm.cli import RUN_KEYS, SECTIONS, build_parser, resolve_heal_settings, resolve_settings
from sglp_llm.config import SGLPConfig
from sglp_llm.heal import HealConfig
from sglp_llm.model.loading import DTYPES

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
# decoder blocks (num_hidden_layers) of each recipe's model, from its published config.json
# (no download); None is the packaged SmolLM2-135M
MODEL_LAYERS = {
    None: 30,
    "meta-llama/Llama-2-7b-hf": 32,
    "meta-llama/Meta-Llama-3-8B": 32,
    "meta-llama/Llama-3.1-8B": 32,
    "mistralai/Mistral-7B-v0.3": 32,
    "Qwen/Qwen2.5-7B": 28,
    "google/gemma-2-9b": 42,
    "meta-llama/Llama-3.1-70B": 80,
    "Qwen/Qwen3-8B-Base": 36,
    "google/gemma-3-4b-pt": 34,  # text_config's
    "mistralai/Mistral-Small-3.1-24B-Base-2503": 40,  # text_config's
}
# the family depth each recipe (by file name) is written for
LAYER_COUNTS = {
    "smollm2-135m": 30,
    "llama-2-7b": 32,
    "llama-3-8b": 32,
    "llama-3.1-8b": 32,
    "mistral-7b": 32,
    "qwen2.5-7b": 28,
    "gemma-2-9b": 42,
    "llama-3.1-70b": 80,
    "qwen3-8b": 36,
    "gemma-3-4b": 34,
    "mistral-small-3.1-24b": 40,
}


def _recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_recipe_is_listed():
    assert sorted(p.stem for p in RECIPES) == sorted(LAYER_COUNTS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid_and_fits_the_model(path):
    data = _recipe(path)
    assert set(data) <= set(RUN_KEYS) | set(SECTIONS)
    assert MODEL_LAYERS[data["model"]] == LAYER_COUNTS[path.stem]
    config = SGLPConfig.from_dict(data["sglp"])
    assert config == SGLPConfig.load(path)
    layers = LAYER_COUNTS[path.stem]
    assert 0 < config.resolve_drop(layers) < layers
    if data["model"] is not None:  # the big models: the ~20-25 % cut their comments cite
        assert 0.2 <= config.resolve_drop(layers) / layers <= 0.25
        assert data["dtype"] == "bfloat16"
        # spread over the GPUs, or (models larger than one GPU) blocks read from disk one at a time
        assert data.get("device_map") == "auto" or (data.get("blocks_on_disk") and config.offload == "sequential")
    assert data["dtype"] in DTYPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_heal_section_is_a_valid_heal_config(path):
    heal = _recipe(path)["heal"]
    config = HealConfig.from_dict(heal)
    assert config == HealConfig.load(path)
    if config.dataset is not None:  # perplexity before and after on another split than training
        assert (config.eval_dataset, config.eval_split) != (config.dataset, config.dataset_split)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_says_where_its_numbers_come_from(path):
    comments = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "Run: sglp-llm prune --recipe recipes/" + path.name in comments
    if _recipe(path)["model"] is not None:
        assert "none were measured on this model here" in comments


def test_the_70b_recipe_offloads_block_by_block():
    data = _recipe(Path(__file__).resolve().parents[1] / "recipes" / "llama-3.1-70b.yaml")
    assert SGLPConfig.from_dict(data["sglp"]).offload == "sequential"


def test_flags_override_the_recipe_for_prune_and_heal():
    path = next(p for p in RECIPES if p.stem == "llama-3.1-8b")
    args = build_parser().parse_args(
        ["prune", "--recipe", str(path), "--drop", "6", "--heal", "--heal-steps", "7",
         "--heal-target-modules", "q_proj,v_proj"]
    )
    run, config = resolve_settings(args)
    heal = resolve_heal_settings(args, "heal_")
    assert run["model"] == "meta-llama/Llama-3.1-8B" and config.drop == 6
    assert heal.steps == 7 and heal.target_modules == ["q_proj", "v_proj"] and heal.seq_len == 1024

    args = build_parser().parse_args(["heal", "pruned", "--recipe", str(path), "--output", "o", "--rank", "4"])
    heal = resolve_heal_settings(args)
    assert heal.rank == 4 and heal.steps == 500 and heal.eval_split == "test"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_loads_unchanged_and_as_sections(recipe):
    """The shipped recipes are flat; the same settings grouped in sections give the same config."""
    settings = yaml.safe_load(recipe.read_text())["sglp"]
    config = SGLPConfig.from_dict(settings)
    assert config.to_dict() == {**SGLPConfig(drop=config.drop, ratio=config.ratio).to_dict(), **settings}
    assert SGLPConfig.from_dict(config.to_sections()) == config
