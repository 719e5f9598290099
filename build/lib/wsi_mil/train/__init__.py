"""The training loop, losses, samplers and weights-only checkpoints."""
