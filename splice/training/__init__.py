"""The training loop, its loss, config, run directory, state checkpoints, CUDA graphs and logs."""
