"""splice: LoRA fine-tuning built on a general PyTorch model rewriter."""

from .adapters import load_adapter, save_adapter
from .freeze import TrainableSummary, freeze, trainable_summary
from .lora import LoraConfig, add_lora, lora_modules, merge, unmerge
from .quant import quantize_int8, quantize_nf4
from .rewrite import Around, Node, NothingMatchedError, Replace, kind_of, nodes, rewrite, unrewrite

__version__ = "0.1.0"

__all__ = [
    "Around",
    "LoraConfig",
    "Node",
    "NothingMatchedError",
    "Replace",
    "TrainableSummary",
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
]
