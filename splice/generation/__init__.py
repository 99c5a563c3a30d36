"""KV-cached generation with per-row adapters."""
