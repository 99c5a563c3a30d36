"""Sibling projections in one weight buffer, so inference runs one GEMM where a layer has several.

A decoder layer reads the same input with q, k and v (and the MLP with gate and up). At decode
batch sizes each GEMM is bound by reading its weight, and the small ones (k and v: 8 MB each in
Llama-3-8B) lose a third of their time to launch and tail effects: one GEMM over the concatenated
weight ``[W_q; W_k; W_v]`` (N_q + N_k + N_v, K) reads the same bytes in fewer, fuller passes (H200,
batch 1-256: q/k/v 28-38 -> 18-23 µs, gate/up 62 -> 58 µs per layer;
``benchmarks/projection_fusion.py``).

:func:`pack_projections` changes only where the weights live, as ``model.to`` does: each group's
weights are copied into one new buffer and every ``nn.Linear`` of the group gets a view of its
rows (same values, same modules, same parameters' names; the old storage is freed). Nothing
else changes, so every ordinary forward, training step or save is unaffected. :func:`packed`
returns the group's concatenated weight (and bias) as a view when the group's modules are still
plain linears (or plain linears inside an adapter bank's sites: the caller then adds the bank's
deltas to the packed output, :func:`~splice.lora.bank.add_packed_delta`) whose weights sit back to
back in one buffer, and None otherwise (a LoRA or quantized wrapper, weights moved or re-created
since): callers then run the projections one by one, so a stale layout can never give wrong results.
The bases of LoRA linears (a training model's, for its rollouts) are packed too; ``packed(..., lora=True)``
gives their weight, to which the caller adds the adapters
(:func:`~splice.fused.modules.packed_lora`). Their buffer keeps ``R`` more rows after the weights (``R``: the
adapters' summed rank; :func:`lora_tail`), where an engine call puts the stacked ``A``: one GEMM then computes
the bases' outputs and the adapters' down-projection ``x A^T`` together (at decode sizes, one launch less and
no split-K pass of its own for each group; the extra rows add R / N to the bytes read, 0.8% for q/k/v at r16).

4-bit groups are not copied: :func:`nf4_group_output` runs sibling NF4 linears (QLoRA bases, ``quantize="nf4"``)
over one row of activations in one launch over their separate weights
(:func:`~splice.kernels.nf4_gemv.nf4_linear_group`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from splice.core.rewrite import Around
from splice.kernels.nf4_gemv import nf4_linear_group
from splice.lora.bank import bank_site
from splice.lora.layers import LoraLinear
from splice.quant.linear import NF4Linear
from splice.quant.nf4 import NF4Tensor

__all__ = ["GROUPS", "lora_tail", "nf4_group_output", "pack_projections", "packed"]

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _lora_base(module: object) -> object:
    """The base of a LoRA rewrite (``Around`` over a :class:`LoraLinear`), else ``module`` itself."""
    return module.base if isinstance(module, Around) and isinstance(module.rewriter, LoraLinear) else module


def _plain(modules: Sequence[object], *, lora: bool = False) -> list[nn.Linear] | None:
    """The linears of ``modules`` if every one is exactly an ``nn.Linear`` (or one inside an adapter
    bank's site, whose delta the caller adds: :func:`~splice.lora.bank.add_packed_delta`; ``lora``: or
    the base of a LoRA linear) on one device and dtype, same input width, all with bias or all without;
    else None."""
    bases = [m.base if isinstance(m, nn.Module) and bank_site(m) is not None else m for m in modules]
    bases = [_lora_base(m) for m in bases] if lora else bases
    # a sharded weight (FSDP2's DTensor) is FSDP2's to place: left as it is
    if not all(type(m) is nn.Linear and type(m.weight.data) is Tensor for m in bases):
        return None
    linears: list[nn.Linear] = list(bases)  # type: ignore[arg-type]
    first = linears[0].weight
    same = all(m.weight.dtype == first.dtype and m.weight.device == first.device
               and m.in_features == linears[0].in_features for m in linears)
    biased = {m.bias is not None for m in linears}
    return linears if same and len(biased) == 1 else None


def nf4_group_output(modules: Sequence[object], x: Tensor) -> Tensor | None:
    """``[x W_0^T | x W_1^T | ...]`` (1, N_0 + N_1 + ...) in one launch when ``modules`` are unbiased NF4 linears (or
    ones inside an adapter bank's sites: the caller adds the bank's deltas, as for :func:`packed`) and ``x`` is one
    row outside autograd, where the grouped kernel applies; else None (then one call each)."""
    if torch.is_grad_enabled():
        return None
    bases = [m.base if isinstance(m, nn.Module) and bank_site(m) is not None else m for m in modules]
    weights: list[NF4Tensor] = []
    for m in bases:
        if not isinstance(m, NF4Linear) or m.bias is not None or m.nf4.flat or m.nf4.transposed:
            return None
        weights.append(m.nf4)
    return nf4_linear_group(x, weights)


def _adjacent(tensors: Sequence[Tensor]) -> Tensor | None:
    """The rows of ``tensors`` (each contiguous, same trailing shape) as one tensor, a view of their
    shared storage when they lie back to back in it; else None."""
    first = tensors[0]
    if not all(t.is_contiguous() and t.shape[1:] == first.shape[1:] and t.dtype == first.dtype for t in tensors):
        return None
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def packed(modules: Sequence[object], *, lora: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """The concatenated weight (and bias) of ``modules`` as views, if they are packed plain linears
    (``lora``: or LoRA linears over packed plain bases: the bases' weight, without the adapters)."""
    linears = _plain(modules, lora=lora)
    if linears is None:
        return None
    weight = _adjacent([m.weight for m in linears])
    if weight is None:
        return None
    if linears[0].bias is None:
        return weight, None
    bias = _adjacent([m.bias for m in linears if m.bias is not None])
    return (weight, bias) if bias is not None else None


def _lora_rank(modules: Sequence[object]) -> int:
    """The summed rank of ``modules``' LoRA adapters when every one is a LoRA linear (else 0)."""
    loras = [m.rewriter for m in modules if isinstance(m, Around) and isinstance(m.rewriter, LoraLinear)]
    return sum(int(lora.lora_A.weight.shape[0]) for lora in loras) if len(loras) == len(modules) else 0


def lora_tail(modules: Sequence[object], *, pair: tuple[Tensor, Tensor | None] | None = None) -> Tensor | None:
    """For LoRA linears over bases :func:`pack_projections` packed: the bases' weight extended by the ``R`` rows
    packed after it (``R``: the adapters' summed rank), ``(N + R, K)``, a view of the group's own buffer. An
    engine call writes the stacked ``A`` into those rows (:mod:`splice.lora.casts`), so one GEMM gives
    ``[x W^T | x A^T]`` (:func:`~splice.fused.modules.packed_lora`). None when the buffer has no such rows (packed
    before the adapters came, moved since, or biased bases). ``pair``: ``packed(modules, lora=True)`` if the
    caller has it."""
    pair, rank = pair or packed(modules, lora=True), _lora_rank(modules)
    if pair is None or pair[1] is not None or rank == 0:
        return None
    weight = pair[0]
    rows, width = weight.shape
    # the buffer _pack made: the group from its first element, exactly R rows after it and nothing else
    if weight.storage_offset() != 0 or weight.untyped_storage().nbytes() != (rows + rank) * width * weight.element_size():
        return None
    return weight.as_strided((rows + rank, width), weight.stride(), 0)


def _pack(linears: list[nn.Linear], *, tail: int = 0) -> None:
    """One buffer for the group's weights (and one for its biases), ``tail`` zero rows after the weights."""
    for name in ("weight", "bias"):
        parts = [getattr(m, name) for m in linears]
        if parts[0] is None:
            continue
        extra = [parts[0].detach().new_zeros(tail, *parts[0].shape[1:])] if name == "weight" and tail else []
        buffer = torch.cat([p.detach() for p in parts] + extra)
        start = 0
        for part in parts:  # the same Parameter objects, now views: an optimizer or DDP holding them goes on
            part.data = buffer[start: start + part.shape[0]]
            start += part.shape[0]


def pack_projections(model: nn.Module) -> int:
    """Pack every q/k/v and gate/up group of plain linears, or of LoRA linears' plain bases, in ``model``
    (module docstring); returns how many groups are packed now (already packed ones included)."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            for names in GROUPS:
                members = [getattr(module, n, None) for n in names]
                linears = _plain(members, lora=True)
                if linears is None:
                    continue
                if packed(linears) is None:  # LoRA bases: rows for the adapters' stacked A after them (lora_tail)
                    _pack(linears, tail=_lora_rank(members) if all(m.bias is None for m in linears) else 0)
                count += 1
    return count
