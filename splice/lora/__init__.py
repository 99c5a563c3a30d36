"""LoRA layers and config, per-call adapter routing, freezing, PEFT-format adapter files."""
