"""Activation checkpointing, what a checkpointed layer keeps for its recompute, CPU offload."""
