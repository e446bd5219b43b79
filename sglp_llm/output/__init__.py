"""What a run writes: verification of the rewritten model, sharded safetensors, the model card and
heatmap, and Hub upload."""
