"""The model being pruned: finding its decoder blocks, loading it (Hub, GGUF, local folders, blocks
on disk), where its weights live, the one handle every stage takes, and rewriting it without the
dropped blocks."""
