"""splice: LoRA fine-tuning built on a general PyTorch model rewriter.

This module is the flat public facade: ``splice.add_lora``, ``splice.train``, ... Every name is
imported from its sub-package on first use, so ``import splice`` (and ``splice --help``) loads
neither torch nor transformers. The sub-packages, lowest layer first, are listed in
``LAYERS``; a module imports only from its own package or lower ones.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Sub-packages from the lowest layer to the highest (tests/test_layout.py enforces the order).
LAYERS = (
    "core", "kernels", "quant", "lora", "models", "memory", "fused", "data", "engine", "generation",
    "evaluation", "export", "distributed", "training", "serve", "commands", "cli",
)

# public name -> module that defines it
_EXPORTS = {
    # the rewriter
    "Around": "core.rewrite", "Node": "core.rewrite", "NothingMatchedError": "core.rewrite",
    "Replace": "core.rewrite", "kind_of": "core.rewrite", "nodes": "core.rewrite",
    "rewrite": "core.rewrite", "unrewrite": "core.rewrite",
    # LoRA
    "LoraConfig": "lora.layers", "add_lora": "lora.apply", "adapter_names": "lora.apply",
    "lora_modules": "lora.apply", "merge": "lora.apply", "unmerge": "lora.apply",
    "adapters_disabled": "lora.apply", "use_adapters": "lora.apply",
    "freeze": "lora.freeze", "trainable_summary": "lora.freeze", "TrainableSummary": "lora.freeze",
    "load_adapter": "lora.peft_io", "save_adapter": "lora.peft_io",
    # quantization
    "quantize_int8": "quant.linear", "quantize_nf4": "quant.linear", "quantize_fp8": "quant.fp8",
    # models, data
    "load_model": "models.loading",
    "read_rows": "data.rows", "split_rows": "data.rows", "tokenize_rows": "data.rows",
    "PromptTemplate": "data.rows", "ChatTemplate": "data.rows", "batches": "data.batching",
    # speed and memory
    "fuse": "fused.apply", "unfuse": "fused.apply", "checkpoint_layers": "memory.checkpointing",
    "embeddings_to_host": "memory.host_embedding",
    # training, generation, evaluation
    "train": "training.loop", "TrainConfig": "training.config",
    "causal_lm_loss": "training.loss", "model_hidden_states": "training.loss",
    "lm_head_params": "training.loss",
    "generate": "generation.generate",
    "build_function_names": "data.function_names", "name_metrics": "evaluation.tasks",
    # errors
    "SpliceError": "core.errors", "UsageError": "core.errors", "RunError": "core.errors",
    # QLoRA and big models
    "NF4Tensor": "quant.nf4", "load_quantized": "models.streaming", "random_quantized": "models.streaming",
    # LoRA variants
    "DoraLinear": "lora.dora_layers", "DoraConv2d": "lora.dora_layers",
    # serving: the decode engine (the server is `splice serve`; splice.serve is its package)
    "Engine": "engine.engine", "SamplingParams": "engine.sampling",
    # export
    "export_gguf": "export.gguf", "export_lora_gguf": "export.gguf",
}
# Old names kept working (with a warning): name -> (new name, module)
_RENAMED = {"accelerate": ("fuse", "fused.apply"), "decelerate": ("unfuse", "fused.apply")}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"splice.{_EXPORTS[name]}"), name)
    elif name in _RENAMED:
        new, module = _RENAMED[name]
        warnings.warn(f"splice.{name} is now splice.{new}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"splice.{module}"), new)
    else:
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    # Cache on the package, so later lookups skip this hook. No sub-package shares a public
    # name, so importing a sub-package can never shadow a function here.
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from splice.core.rewrite import (
        Around,
        Node,
        NothingMatchedError,
        Replace,
        kind_of,
        nodes,
        rewrite,
        unrewrite,
    )
    from splice.data.batching import batches
    from splice.data.function_names import build_function_names
    from splice.data.rows import ChatTemplate, PromptTemplate, read_rows, split_rows, tokenize_rows
    from splice.engine.engine import Engine
    from splice.engine.sampling import SamplingParams
    from splice.evaluation.tasks import name_metrics
    from splice.export.gguf import export_gguf, export_lora_gguf
    from splice.fused.apply import fuse, unfuse
    from splice.generation.generate import generate
    from splice.lora.apply import (
        adapter_names,
        adapters_disabled,
        add_lora,
        lora_modules,
        merge,
        unmerge,
        use_adapters,
    )
    from splice.lora.dora_layers import DoraConv2d, DoraLinear
    from splice.lora.freeze import TrainableSummary, freeze, trainable_summary
    from splice.lora.layers import LoraConfig
    from splice.lora.peft_io import load_adapter, save_adapter
    from splice.memory.checkpointing import checkpoint_layers
    from splice.memory.host_embedding import embeddings_to_host
    from splice.models.loading import load_model
    from splice.models.streaming import load_quantized, random_quantized
    from splice.quant.linear import quantize_int8, quantize_nf4
    from splice.quant.nf4 import NF4Tensor
    from splice.training.config import TrainConfig
    from splice.training.loop import train
    from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states

__all__ = sorted(_EXPORTS)
