"""Judging a model: strided perplexity on held-out text, generation speed, and lm-eval tasks
(including the shipped offline `sglp_local_ppl`)."""
