"""The rewriter and what every layer above shares: targets, per-call context, the model-family table, atomic file writes."""
