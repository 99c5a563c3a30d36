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

Sibling projections of one input (q/k/v, gate/up) whose bases sit packed in one weight
(:mod:`splice.fused.projections`) also get one copy for the group (``groups``), so the whole group runs as
three GEMMs whatever its size (:func:`~splice.fused.modules.packed_lora`): ``A = [A_1; ..; A_G]`` (R, K)
with ``R = r_1 + .. + r_G``, and ``B`` (N_1 + .. + N_G, R) block-diagonal with block ``j`` = ``s_j B_j``
(the layer's scale folded in), so ``x A^T B^T`` is every layer's delta side by side. :func:`group_cast`
hands it out. Where the packed bases' buffer has rows for it (``groups`` gives them), ``A`` is written there,
so the bases' GEMM computes ``x A^T`` too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType

import torch
from torch import Tensor, nn

from splice.lora.apply import lora_modules
from splice.lora.layers import LoraLinear

__all__ = ["AdapterCasts", "adapter_cast", "group_cast"]

Pair = tuple[Tensor, Tensor]
_CASTS: ContextVar[Mapping[int, Pair]] = ContextVar("splice_adapter_casts", default=MappingProxyType({}))
_GROUPS: ContextVar[Mapping[tuple[int, ...], Pair]] = ContextVar("splice_adapter_group_casts",
                                                                default=MappingProxyType({}))


def adapter_cast(layer: nn.Module) -> Pair | None:
    """``layer``'s (A, B) in the compute dtype while an :meth:`AdapterCasts.active` block holds them."""
    return _CASTS.get().get(id(layer))


def group_cast(layers: Sequence[nn.Module]) -> Pair | None:
    """The stacked ``A`` (R, K) and block-diagonal scaled ``B`` (N, R) of sibling ``layers`` (module doc)
    while an :meth:`AdapterCasts.active` block holds them."""
    return _GROUPS.get().get(tuple(id(layer) for layer in layers))


class AdapterCasts:
    """Compute-dtype (``dtype``: 16-bit, the activations') copies of the factors of ``model``'s LoRA
    linears whose masters are in another dtype (layers already in it need none and get none), and of the
    sibling groups ``groups(model)`` names (module doc). Copies are kept for the object's life (a CUDA
    graph may read them), keyed by layer."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype,
                 groups: Callable[[nn.Module], Sequence[tuple[Sequence[LoraLinear], Tensor | None]]] | None = None
                 ) -> None:
        self.model, self.dtype, self.groups = model, dtype, groups
        # keyed by the layer object, which outlives its parameters (an FSDP2 gather makes new ones)
        self.copies: dict[int, Pair] = {}
        self.group_copies: dict[tuple[int, ...], Pair] = {}
        self._held: tuple[Mapping[int, Pair], Mapping[tuple[int, ...], Pair]] = (MappingProxyType({}),
                                                                                 MappingProxyType({}))

    def _layers(self) -> list[LoraLinear]:
        return [layer for _, _, layer in lora_modules(self.model)
                if isinstance(layer, LoraLinear) and layer.lora_A.weight.dtype != self.dtype]

    def refresh(self) -> None:
        """Copy the live masters into the copies, in place (the same storage every call); the model's
        LoRA layers and groups are listed anew (adapters may have been added since)."""
        if self.dtype not in (torch.bfloat16, torch.float16):
            return
        layers, groups = self._layers(), list(self.groups(self.model)) if self.groups is not None else []
        with torch.no_grad():
            for layer in layers:
                a, b = layer.lora_A.weight, layer.lora_B.weight
                held = self.copies.get(id(layer))
                if held is None or held[0].shape != a.shape or held[0].device != a.device:
                    held = (torch.empty(a.shape, dtype=self.dtype, device=a.device),
                            torch.empty(b.shape, dtype=self.dtype, device=b.device))
                    self.copies[id(layer)] = held
                held[0].copy_(a)
                held[1].copy_(b)
            keys = [self._refresh_group(group, home) for group, home in groups]
        # only what this refresh wrote is handed out: a layer gone (or now in the compute dtype) reads its own
        self._held = (MappingProxyType({id(layer): self.copies[id(layer)] for layer in layers}),
                      MappingProxyType({key: self.group_copies[key] for key in keys}))

    def _refresh_group(self, group: Sequence[LoraLinear], home: Tensor | None) -> tuple[int, ...]:
        """Write the group's copies; ``home``: where its stacked ``A`` lives, if somewhere is given (the rows
        after the packed bases: :func:`~splice.fused.projections.lora_tail`)."""
        ranks = [layer.lora_A.weight.shape[0] for layer in group]
        widths = [layer.lora_B.weight.shape[0] for layer in group]
        first = group[0].lora_A.weight
        shape_a, shape_b = (sum(ranks), first.shape[1]), (sum(widths), sum(ranks))
        if home is not None and (home.shape != shape_a or home.dtype != self.dtype or home.device != first.device):
            home = None
        key = tuple(id(layer) for layer in group)
        held = self.group_copies.get(key)
        if (held is None or held[0].shape != shape_a or held[1].shape != shape_b or held[0].device != first.device
                or (home is not None and held[0].data_ptr() != home.data_ptr())):
            held = (home if home is not None else torch.empty(shape_a, dtype=self.dtype, device=first.device),
                    torch.zeros(shape_b, dtype=self.dtype, device=first.device))  # off-diagonal: 0 for good
            self.group_copies[key] = held
        row = col = 0
        for layer, rank, width in zip(group, ranks, widths, strict=True):
            held[0][col: col + rank].copy_(layer.lora_A.weight)
            held[1][row: row + width, col: col + rank].copy_(layer.lora_B.weight * layer.scale)
            row, col = row + width, col + rank
        return key

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the layers' inference forwards read the copies as of the last :meth:`refresh`
        (none before the first)."""
        tokens = _CASTS.set(self._held[0]), _GROUPS.set(self._held[1])
        try:
            yield
        finally:
            _GROUPS.reset(tokens[1])
            _CASTS.reset(tokens[0])
