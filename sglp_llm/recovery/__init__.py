"""Winning back what removed blocks did: least-squares compensation, block-local training of kept
blocks, and the distillation and training used by healing."""
