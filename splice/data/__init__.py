"""Rows from files, prompt and chat templates, answer-only labels, padded or packed batches."""
