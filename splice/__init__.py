"""splice: LoRA fine-tuning built on a general PyTorch model rewriter.

The core (rewriter, LoRA, adapters, freezing, quantization) is imported eagerly; the pieces that
need ``transformers`` (model loading, data, training, generation) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from splice.core.rewrite import Around, Node, NothingMatchedError, Replace, kind_of, nodes, rewrite, unrewrite
from splice.lora.freeze import TrainableSummary, freeze, trainable_summary
from splice.lora.layers import (
    LoraConfig,
    adapter_names,
    adapters_disabled,
    add_lora,
    lora_modules,
    merge,
    unmerge,
    use_adapters,
)
from splice.lora.peft_io import load_adapter, save_adapter
from splice.quant.linear import quantize_int8, quantize_nf4

__version__ = "0.1.0"

_LAZY = {
    "load_model": "models.loading",
    "read_rows": "data.rows",
    "split_rows": "data.rows",
    "tokenize_rows": "data.rows",
    "batches": "data.batching",
    "PromptTemplate": "data.rows",
    "ChatTemplate": "data.rows",
    "build_function_names": "evaluation.tasks",
    "name_metrics": "evaluation.tasks",
    "causal_lm_loss": "training.loss",
    "model_hidden_states": "training.loss",
    "lm_head_params": "training.loss",
    "generate": "generation.generate",
    "train": "training.loop",
    "TrainConfig": "training.config",
    "accelerate": "fused.modules",
    "checkpoint_layers": "memory.checkpointing",
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
