"""Training: losses, layer-wise LR decay, checkpoints, early stopping, the fold trainer and CV."""
