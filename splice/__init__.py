"""splice: LoRA fine-tuning built on a general PyTorch model rewriter.

The core (rewriter, LoRA, adapters, freezing, quantization) is imported eagerly; the pieces that
need ``transformers`` (model loading, data, training, generation) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .adapters import load_adapter, save_adapter
from .freeze import TrainableSummary, freeze, trainable_summary
from .lora import (
    LoraConfig,
    adapter_names,
    adapters_disabled,
    add_lora,
    lora_modules,
    merge,
    unmerge,
    use_adapters,
)
from .quant import quantize_int8, quantize_nf4
from .rewrite import Around, Node, NothingMatchedError, Replace, kind_of, nodes, rewrite, unrewrite

__version__ = "0.1.0"

_LAZY = {
    "load_model": "models",
    "read_rows": "data",
    "split_rows": "data",
    "tokenize_rows": "data",
    "batches": "batching",
    "PromptTemplate": "data",
    "ChatTemplate": "data",
    "build_function_names": "tasks",
    "name_metrics": "tasks",
    "causal_lm_loss": "loss",
    "model_hidden_states": "loss",
    "lm_head_params": "loss",
    "generate": "generate",
    "train": "train",
    "TrainConfig": "config",
    "accelerate": "fast",
    "checkpoint_layers": "checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'splice' has no attribute {name!r}")


__all__ = [
    "Around",
    "LoraConfig",
    "Node",
    "NothingMatchedError",
    "Replace",
    "TrainableSummary",
    "adapter_names",
    "adapters_disabled",
    "add_lora",
    "freeze",
    "kind_of",
    "load_adapter",
    "lora_modules",
    "merge",
    "nodes",
    "quantize_int8",
    "quantize_nf4",
    "rewrite",
    "save_adapter",
    "trainable_summary",
    "unmerge",
    "unrewrite",
    "use_adapters",
    *_LAZY,
]
