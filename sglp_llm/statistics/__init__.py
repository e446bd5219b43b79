"""What the passes measure: linear CKA between block outputs and the gradient scores (GradNorm,
Taylor gates) of every block."""
