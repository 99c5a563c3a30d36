"""The fused-kernel rewrites: ``fuse(model)`` swaps splice's GPU kernels into a model."""
