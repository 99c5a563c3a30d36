"""Export: trained models and adapters in formats other tools load (GGUF for llama.cpp / Ollama)."""
