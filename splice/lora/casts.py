"""LoRA factors rounded once to the compute dtype, for a run of inference steps.

Adapters train with float32 master weights (as PEFT keeps them) over a 16-bit base, so every forward
rounds ``A`` (r, in) and ``B`` (out, r) to the activations' dtype first: two cast kernels per LoRA
projection. At decode batch sizes a kernel costs a few microseconds whatever its size, and an 8B model
with r16 on all seven projections has 224 of them: 448 casts a step, the most launches of any op in a
GRPO rollout. :class:`AdapterCasts` keeps one compute-dtype copy of each factor for a whole
:meth:`~splice.engine.engine.Engine.generate` call; :meth:`~AdapterCasts.refresh` rewrites them in
place from the live masters (training moves them between calls), so CUDA graphs captured over the
copies stay valid. The copies hold the same values the per-call casts would make (bf16 rounding of the
masters), so greedy tokens do not change. Inside :meth:`~AdapterCasts.active` (this thread / task only,
a ContextVar), :func:`adapter_cast` hands a layer's copies to its inference forward. The engine refreshes
them when a :meth:`~splice.engine.engine.Engine.generate` call or a serving loop starts, and reads them in
every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType

import torch
from torch import Tensor, nn

from splice.lora.apply import lora_modules
from splice.lora.layers import LoraLinear

__all__ = ["AdapterCasts", "adapter_cast"]

_CASTS: ContextVar[Mapping[int, tuple[Tensor, Tensor]]] = ContextVar("splice_adapter_casts",
                                                                      default=MappingProxyType({}))


def adapter_cast(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``layer``'s (A, B) in the compute dtype while an :meth:`AdapterCasts.active` block holds them."""
    return _CASTS.get().get(id(layer))


class AdapterCasts:
    """Compute-dtype (``dtype``: 16-bit, the activations') copies of the factors of ``model``'s LoRA
    linears whose masters are in another dtype; layers already in it need none and get none. Copies
    are kept for the object's life (a CUDA graph may read them), keyed by layer."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        # keyed by the layer object, which outlives its parameters (an FSDP2 gather makes new ones)
        self.copies: dict[int, tuple[Tensor, Tensor]] = {}
        self._held: Mapping[int, tuple[Tensor, Tensor]] = MappingProxyType({})

    def _layers(self) -> list[LoraLinear]:
        if self.dtype not in (torch.bfloat16, torch.float16):
            return []
        return [layer for _, _, layer in lora_modules(self.model)
                if isinstance(layer, LoraLinear) and layer.lora_A.weight.dtype != self.dtype]

    def refresh(self) -> None:
        """Copy the live masters into the copies, in place (the same storage every call); the model's
        LoRA layers are listed anew (adapters may have been added since)."""
        with torch.no_grad():
            for layer in self._layers():
                a, b = layer.lora_A.weight, layer.lora_B.weight
                held = self.copies.get(id(layer))
                if held is None or held[0].shape != a.shape or held[0].device != a.device:
                    held = (torch.empty(a.shape, dtype=self.dtype, device=a.device),
                            torch.empty(b.shape, dtype=self.dtype, device=b.device))
                    self.copies[id(layer)] = held
                held[0].copy_(a)
                held[1].copy_(b)
        self._held = MappingProxyType(dict(self.copies))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the layers' inference forwards read the copies as of the last :meth:`refresh`
        (none before the first)."""
        token = _CASTS.set(self._held)
        try:
            yield
        finally:
            _CASTS.reset(token)
