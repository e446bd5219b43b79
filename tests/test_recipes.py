"""Every shipped recipe parses into a valid config that fits its model family's depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sglp_llm.cli import RUN_KEYS
from sglp_llm.config import SGLPConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
# decoder blocks per model family, from the published configs (no download)
LAYER_COUNTS = {"smollm2-135m": 30}


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid_and_fits_the_model(path):
    data = yaml.safe_load(path.read_text())
    assert set(data) <= set(RUN_KEYS) | {"sglp"}
    config = SGLPConfig.from_dict(data["sglp"])
    assert config == SGLPConfig.load(path)
    assert 0 < config.resolve_drop(LAYER_COUNTS[path.stem]) < LAYER_COUNTS[path.stem]
