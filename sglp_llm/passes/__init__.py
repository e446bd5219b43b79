"""How data moves through the model: hooks on block inputs and outputs, whole-model and
block-by-block (sequential) passes, the head's chunked loss, hidden-state stores, data parallel
reductions, analysis checkpoints and the memory plan they run under."""
