"""Loading Hugging Face folders and GGUF files (the embedded default model); ``streaming``:
quantize-on-load from safetensors onto a meta-device skeleton (and random-weight models)."""
