"""Weight-only quantization (int8, NF4) as replace rewrites."""
