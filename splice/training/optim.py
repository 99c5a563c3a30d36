"""A run's optimizer and learning-rate schedule, and LoRA+'s parameter groups.

:func:`make_optimizer` builds AdamW or SGD (over LoRA+ groups with a ratio); :func:`lr_at` is the
schedule (linear warmup, then cosine, linear or constant). LoRA+ (Hayou et al. 2024): ``lora_B``
learns ``ratio`` times faster than ``lora_A``; :func:`param_groups` sorts the trainable
parameters into the four groups PEFT's ``create_loraplus_optimizer`` builds, in its order, for any ``torch.optim`` optimizer:

1. A: every other trainable parameter (``lora_A``, conv magnitudes), at ``lr``;
2. embedding: the parameters of LoRA embedding layers, at ``lr_embedding`` (PEFT: 1e-6);
3. B: ``lora_B`` and the other 1-D parameters (the linear DoRA magnitudes), at ``lr * ratio``;
4. B without weight decay: those of group 3 named ``*bias*`` or in an ``nn.LayerNorm``.

Groups 1-3 take ``weight_decay`` (PEFT's ``loraplus_weight_decay``), group 4 none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from splice.lora.apply import lora_modules
from splice.lora.layers import LoraEmbedding

__all__ = ["lr_at", "make_optimizer", "param_groups"]


def lr_at(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def make_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                   loraplus_ratio: float | None) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9) over ``model``'s trainable parameters (LoRA+'s groups with a
    ``loraplus_ratio``)."""
    params: Any = ([p for p in model.parameters() if p.requires_grad] if loraplus_ratio is None
                   else param_groups(model, lr=lr, ratio=loraplus_ratio, weight_decay=weight_decay))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'adamw' or 'sgd'")


def _no_decay_names(model: nn.Module) -> set[str]:
    """What PEFT's LoRA+ exempts from weight decay (Hugging Face's rule): parameters named
    ``*bias*`` and those of ``nn.LayerNorm`` modules (not RMSNorm: the list is ``[nn.LayerNorm]``)."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm)
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or "bias" in full:
                names.add(full)
    return names


def param_groups(model: nn.Module, *, lr: float, ratio: float, lr_embedding: float = 1e-6,
                 weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of ``model``'s trainable parameters (module doc)."""
    if ratio <= 0:
        raise ValueError(f"the LoRA+ ratio (lr of B / lr of A) must be > 0, got {ratio}; PEFT suggests 16")
    embedding_params = {id(p) for _, _, layer in lora_modules(model) if isinstance(layer, LoraEmbedding)
                        for p in layer.parameters()}
    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_params:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]
