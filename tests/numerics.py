"""Shared helpers for the numerical tests: devices to run on, a relative error, and what Triton's
interpreter cannot check."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from splice.kernels import HAS_TRITON

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]

# Triton's interpreter is on (``make test-kernels-interpreted``): the kernels run on CPU tensors in numpy,
# so the "cpu" cases of DEVICES exercise the Triton paths.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

# What Triton 3.6.0's interpreter computes unlike a GPU, by the name tests/conftest.py skips it under.
# A test declares its case with ``@pytest.mark.interpreter_limit("fp8")`` (or marks one parameter value:
# ``pytest.param(..., marks=pytest.mark.interpreter_limit("fp8"))``). A tl.dot of bf16 operands needs no
# mark: a case that fails after the interpreter took one is reported as skipped (``Bf16Dots``), one that
# passes all the same stays passed. Every bf16 and fp8 case skipped here passed under an interpreter patched
# to round its casts to nearest and to take bf16 dots in fp32 (checked 2026-12-06): none is a kernel bug.
INTERPRETER_LIMITS = {
    "bf16": "Triton's interpreter emulates bf16 with truncating casts (a GPU rounds to nearest) and takes a "
            "tl.dot of bf16 operands over their raw uint16 bits; bf16 kernels are checked on a GPU",
    "fp8": "Triton's interpreter rounds to e4m3 without the carry into the exponent (7.9 becomes 4, not 8); "
           "the e4m3 kernels are checked on a GPU",
    "threads": "Triton's interpreter patches triton.language globally for each launch, so kernels launched "
               "from two threads at once break each other; checked on a GPU",
}


class Bf16Dots:
    """The tl.dots of bf16 operands Triton's interpreter has taken (over their raw bits: garbage) since
    ``count`` was last reset; tests/conftest.py resets it as each test starts."""

    count = 0

    @classmethod
    def watch(cls) -> None:
        """Count them from now on (in the interpreter's dot, for every kernel)."""
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder

        create_dot = InterpreterBuilder.create_dot

        def counted(self: Any, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
            if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
                cls.count += 1
            return create_dot(self, a, b, *args, **kwargs)

        InterpreterBuilder.create_dot = counted


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
