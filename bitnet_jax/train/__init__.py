"""One training run: the pure steps, the loop, optimiser, sharding, checkpoints and metrics."""
