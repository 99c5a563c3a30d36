"""DoRA (weight-decomposed LoRA) math for the LoRA layers, as PEFT defines it.

DoRA (Liu et al. 2024) splits the adapted weight into a direction and a learned magnitude per
output channel: ``W' = m * (W + s B A) / ||W + s B A||``, the norm taken over each output row
(over ``in, kh, kw`` for a convolution) and treated as a constant in the backward (the paper's
section 4.3; PEFT detaches it). ``m`` is ``lora_magnitude_vector``, initialised to the norm so
the adapter starts as a no-op. With ``y = base(x)`` the base output and ``b`` its bias, the layer
returns ``y + (g - 1) (y - b) + g s B(A(x))`` with ``g = m / ||W + s B A||`` (PEFT's form; with
dropout in training the base part is recomputed on the dropped-out input, as PEFT does).

The layers themselves (:class:`splice.lora.layers.DoraLinear`, :class:`~splice.lora.layers.DoraConv2d`)
are LoRA rewriters built by :func:`splice.lora.apply.add_lora` with ``LoraConfig(use_dora=True)``;
the fused GPU path is :func:`splice.kernels.dora.dora_linear`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splice.kernels.dora import dora_weight_norm

__all__ = ["conv_delta", "dora_extra", "merged_weight", "unmerged_weight", "weight_norm"]


def conv_delta(lora_a: Tensor, lora_b: Tensor, shape: torch.Size) -> Tensor:
    """``B A`` of a conv adapter as a kernel of ``shape`` (out, in, kh, kw), unscaled."""
    rank = lora_a.shape[0]
    return (lora_b.reshape(-1, rank) @ lora_a.reshape(rank, -1)).reshape(shape)


def weight_norm(weight: Tensor, delta: Tensor | None = None, *, lora_a: Tensor | None = None,
                lora_b: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``||W + delta||`` per output channel, fp32, detached: (out,) for a 2-D ``weight`` (out, in),
    (1, out, 1, 1) for a conv kernel (PEFT's shapes). Give ``delta`` (already scaled) or the
    linear's ``lora_a``/``lora_b`` and ``scale`` (then ``B A`` is never built on the GPU)."""
    with torch.no_grad():
        if delta is None:
            if weight.dim() != 2 or lora_a is None or lora_b is None:
                raise ValueError("weight_norm: give delta, or lora_a and lora_b for a 2-D weight")
            return dora_weight_norm(weight, lora_a, lora_b, scale)
        total = weight.float() + delta.float()
        if weight.dim() == 2:
            return torch.linalg.norm(total, dim=1)
        return total.norm(p=2, dim=tuple(range(1, total.dim())), keepdim=True).transpose(1, 0)


def dora_extra(base_out: Tensor, lora_out: Tensor, factor: Tensor, scale: float) -> Tensor:
    """What DoRA adds to the base output: ``(g - 1) * base_out + g * s * lora_out``.

    ``base_out`` is the base layer's output without its bias, ``lora_out = B(A(x))``, ``factor``
    ``g = m / ||W + s B A||`` shaped to broadcast over the channel dimension.
    """
    return (factor - 1) * base_out + factor * lora_out * scale


def merged_weight(weight: Tensor, delta: Tensor, factor: Tensor) -> Tensor:
    """``g * (W + delta)`` in ``weight``'s dtype; ``factor`` shaped to broadcast over ``weight``."""
    return (factor * (weight.float() + delta.float())).to(weight.dtype)


def unmerged_weight(weight: Tensor, delta: Tensor, factor: Tensor) -> Tensor:
    """The inverse of :func:`merged_weight`: ``W' / g - delta``."""
    return (weight.float() / factor - delta.float()).to(weight.dtype)
