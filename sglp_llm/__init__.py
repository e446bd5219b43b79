"""sglp-llm: make Hugging Face causal LMs shallower with SGLP.

    from sglp_llm import SGLPConfig, prune
    result = prune(model, config=SGLPConfig(ratio=0.25), tokenizer=tokenizer)
    result.save_pretrained("pruned")
"""

from .api import PruneResult, analyze, prune
from .config import ConfigError, SGLPConfig
from .heal import HealConfig, HealResult, heal, save_healed
from .model.loading import load_pruned
from .plan import PruningPlan

__all__ = [
    "SGLPConfig", "ConfigError", "PruningPlan", "PruneResult", "analyze", "prune",
    "HealConfig", "HealResult", "heal", "save_healed", "load_pruned",
]
__version__ = "0.1.0"
