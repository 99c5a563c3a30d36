"""Adapters in host memory for a :class:`~splice.lora.bank.LoraBank`: a PEFT-format folder read into
:class:`HostAdapter` (each linear module's A and scaled B, a DoRA adapter's factor and shift), checked once
against the served model, then moved into a bank slot on demand (:meth:`~splice.lora.bank.LoraBank.put`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from splice.lora import adapter_file
from splice.lora.adapter_file import AdapterError, on_original_base, require_linear

__all__ = ["HostAdapter", "read_adapter", "read_bank_file"]


@dataclass(frozen=True, kw_only=True)
class HostAdapter:
    """One adapter's weights in host memory: ``path -> (A (r, K), B (N, r) * scale)``; a DoRA adapter's
    modules also in ``dora``: ``path -> (g, (1 - g) * bias)``, (N,) fp32 each, with DoRA's factor
    ``g = m / ||W + s B A||`` of the served weights (see module doc; :func:`~splice.lora.adapter_file.dora_output`)."""

    name: str
    weights: dict[str, tuple[Tensor, Tensor]]
    rank: int
    dora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in (*self.weights.values(), *self.dora.values()))


def read_bank_file(directory: str | Path) -> adapter_file.AdapterFile:
    """The PEFT adapter in ``directory`` if a bank can serve it (linear LoRA / DoRA): every bank reader's check."""
    adapter = adapter_file.read_adapter(directory)
    require_linear(adapter, holder="a LoRA bank", instead="merge it into the model to serve it (splice merge)", dora=True)
    return adapter


def read_adapter(directory: str | Path, *, name: str, base: nn.Module | None = None) -> HostAdapter:
    """The linear LoRA weights of a PEFT-format adapter folder (JSON + safetensors, no pickle), scale folded in.

    A PiSSA/OLoRA adapter trained its A and B on the residual base ``W - s B0 A0``; the bank adds deltas to
    the served ``W``, so with ``base`` (the served model) it is converted as PEFT does: the rank-2r LoRA
    ``[A; A0]``, ``[B, -B0]`` (:func:`~splice.lora.adapter_file.on_original_base`); without ``base`` refused.
    A DoRA adapter needs ``base`` too (:func:`~splice.lora.adapter_file.dora_outputs`). Embedding and conv
    adapters are refused, and with ``base`` one that does not fit it (``check_adapter_fits``)."""
    adapter = read_bank_file(directory)
    if adapter.config.use_dora and base is None:
        raise AdapterError(f"{adapter.directory} is a DoRA adapter: its magnitudes divide by the row norms of the "
                           "served weights W + s B A; pass base=model to read it against them (splice serve does; split over "
                           "ranks, Sharding.read_adapter reads it against each rank's slices)")
    if base is not None:  # refused now, naming the first module that does not fit, not on first use
        adapter_file.check_adapter_fits(adapter, base)
    if adapter.needs_residual_base:
        if base is None:
            raise AdapterError(
                f"{adapter.directory}: init_lora_weights {adapter.init!r}: its A and B apply to the residual base "
                "W - s B0 A0, not to the served weights; pass base=model to convert it (A0, B0 re-derived "
                "from W, as PEFT does) or save it converted: splice.save_adapter(model, dir, convert_to_lora=True)")
        adapter = on_original_base(adapter, base)
    dora = adapter_file.dora_outputs(adapter, base) if base is not None else {}
    return HostAdapter(name=name, weights=adapter.scaled(), rank=adapter.rank, dora=dora)
