"""Which device a ``--device`` name means on this machine, and small host lists sent to it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from splice.core.errors import UsageError

__all__ = ["resolve_device", "to_device"]


def to_device(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a tensor on ``device``, copied without waiting for the device.

    On CUDA the list goes through pinned memory: a copy from pageable memory may make the host wait
    for the stream's earlier kernels, which would stall a step launched ahead of the GPU (the engine's
    overlap). torch's caching host allocator keeps the pinned block until the copy has read it.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means here, or a UsageError saying what this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"device (--device) {name!r} is not a device: use auto, cpu, cuda, cuda:N "
                         "or mps") from None
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and have == 0:
        raise UsageError(f"device (--device) {name!r}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= have:
        raise UsageError(f"device (--device) {name!r}: this machine has {have} GPU(s), "
                         f"cuda:0 to cuda:{have - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device (--device) {name!r}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device (--device) {name!r}: splice trains on cpu, cuda or mps")
    return device
