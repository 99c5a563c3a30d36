"""Fused kernels for LoRA training, each beside a plain PyTorch reference.

Every kernel module holds a Triton kernel, the PyTorch reference it must match, and (where the
op has a backward) a custom ``torch.autograd.Function``. The public functions pick the Triton
path for CUDA tensors when Triton is importable and fall back to the reference otherwise, so the
same code trains on a GPU and runs (more slowly) on a CPU-only CI machine.

Switches (environment variables, read at call time):

* ``SPLICE_NO_TRITON=1``: never use Triton (reference paths everywhere).
* ``TRITON_INTERPRET=1``: Triton's interpreter; then CPU tensors take the Triton path too, which
  lets the kernels be tested without a GPU (slowly).
"""

from __future__ import annotations

import os

from torch import Tensor

try:  # Triton is optional: CI machines without a GPU may not have it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "use_triton"]


def use_triton(*tensors: Tensor) -> bool:
    """Whether the Triton path applies to these tensors (all on CUDA, or the interpreter is on)."""
    if not HAS_TRITON or os.environ.get("SPLICE_NO_TRITON") == "1":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return all(t.is_cuda for t in tensors)


def grid_1d(n: int, block: int) -> tuple[int]:
    """Programs needed to cover ``n`` elements with ``block`` per program."""
    return ((n + block - 1) // block,)


def as_rows(x: Tensor) -> Tensor:
    """``x`` as a contiguous (rows, last_dim) matrix (a view when ``x`` is already contiguous)."""
    return x.contiguous().view(-1, x.shape[-1])

