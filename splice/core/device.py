"""Which device a ``--device`` name means on this machine."""

from __future__ import annotations

import torch

from splice.core.errors import UsageError

__all__ = ["resolve_device"]


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
