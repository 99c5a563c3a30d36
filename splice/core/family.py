"""What splice knows about model families, in one table.

Hugging Face model classes are recognised by class name (splice imports no model code), and a
module of a known class is only treated as such after a structural check in the code that uses
it. Add a family here and every rule that keys on it (fused kernels, checkpointing, targets,
the output head) picks it up.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = [
    "ATTENTION_CLASSES",
    "HEAD_NAMES",
    "LAYER_PATH",
    "MLP_CLASSES",
    "PAGED_ATTENTION_CLASSES",
    "RESIDUAL_MLP_LAYERS",
    "RMSNORM_CLASSES",
    "is_conv1d",
    "is_output_head",
]

# Families whose RMSNorm, MLP and attention forwards are exactly Hugging Face Llama's.
_LLAMA_LIKE = ("Llama", "Mistral", "Qwen2", "Qwen3")
RMSNORM_CLASSES = frozenset(f"{f}RMSNorm" for f in _LLAMA_LIKE)
MLP_CLASSES = frozenset(f"{f}MLP" for f in _LLAMA_LIKE)
# Attention with Llama's q/k/v/o + RoPE forward (checked further by the fused attention rule).
ATTENTION_CLASSES = frozenset({"LlamaAttention"})
# Attention the engine's paged rule replaces: q/k/v/o projections, optional per-head q_norm/k_norm
# (Qwen3, Gemma3), RoPE from the decoder layer's position_embeddings, ``scaling``, and a sliding
# window / logit softcap from the module or its config (see splice.engine.attention).
PAGED_ATTENTION_CLASSES = frozenset(f"{f}Attention" for f in (*_LLAMA_LIKE, "Gemma", "Gemma2", "Gemma3"))
# Decoder layers whose MLP output only enters ``residual + mlp(...)``, the layer's return value.
RESIDUAL_MLP_LAYERS = frozenset(f"{f}DecoderLayer" for f in _LLAMA_LIKE)
# Where decoder layers sit: "...layers.<i>" (Llama), "...h.<i>" (GPT-2), "...blocks.<i>", ...
LAYER_PATH = re.compile(r"(^|\.)(layers|h|blocks|layer)\.\d+$")
# Last path component of the output head (vocabulary projection).
HEAD_NAMES = ("lm_head", "output_layer")


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's ``Conv1D``: a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_output_head(path: str) -> bool:
    return path.split(".")[-1] in HEAD_NAMES
