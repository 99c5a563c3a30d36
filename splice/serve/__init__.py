"""Serving one base model with many adapters behind an OpenAI-compatible endpoint."""
