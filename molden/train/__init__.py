"""Training: one loop for every objective, checkpoints, metrics logs and learning curves."""
