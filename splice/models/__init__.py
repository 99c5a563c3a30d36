"""Loading Hugging Face folders and GGUF files (the embedded default model)."""
