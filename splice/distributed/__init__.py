"""Training on torch.distributed: process groups, DDP and FSDP2 wrapping, sharded checkpoints."""
