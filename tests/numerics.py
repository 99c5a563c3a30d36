"""Shared helpers for the numerical tests: devices to run on and a relative error."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; a non-finite ``a`` fails."""
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


class HostSyncs(TorchDispatchMode):
    """Records the ops that read a tensor value on the host (``.item()``, ``nonzero``, truth
    tests): what a CUDA-graph capture cannot contain. ``synced`` lists them in order."""

    def __init__(self) -> None:
        super().__init__()
        self.synced: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        aten = torch.ops.aten
        if func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default):
            self.synced.append(str(func))
        return func(*args, **(kwargs or {}))
