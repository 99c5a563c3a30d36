"""Metrics, the embedded function-naming task, generation scored against references."""
