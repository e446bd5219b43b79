"""sglp-llm: make Hugging Face causal LMs shallower with SGLP.

    from sglp_llm import SGLPConfig, prune
    result = prune(model, config=SGLPConfig(ratio=0.25), tokenizer=tokenizer)
    result.save_pretrained("pruned")
"""

from .api import PruneResult, analyze, prune
from .config import ConfigError, SGLPConfig
from .plan import PruningPlan

__all__ = ["SGLPConfig", "ConfigError", "PruningPlan", "PruneResult", "analyze", "prune"]
__version__ = "0.1.0"
