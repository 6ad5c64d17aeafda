"""Training loop, optimisers, metrics, run directories, distributed training."""
