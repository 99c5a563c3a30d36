"""Seeded dropout whose mask is recomputed, never stored.

Math: ``out_i = x_i * m_i / (1 - p)`` with ``m_i = [u(seed, i) >= p]``, ``u`` uniform in [0, 1)
and ``i`` the element's index in the contiguous tensor. The mask is a pure function of
``(seed, i)``, so a backward pass (or a recompute under activation checkpointing) regenerates it
from the 31-bit ``seed`` instead of saving a mask or the dropped-out copy of ``x``.

Triton path: Philox (``tl.rand``) per element, one pass. Reference path (CPU, or CUDA without
Triton): ``torch.rand`` from a ``torch.Generator`` seeded with ``seed``. The two paths draw
different masks for the same seed; each is deterministic on its own, which is all the fused LoRA
linear needs (forward and backward take the same path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON, grid_1d, use_triton

__all__ = ["dropout", "dropout_add_", "dropout_mask", "new_seed"]

_BLOCK = 2048

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, n, p, scale, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        keep = tl.rand(seed, offs) >= p
        y = tl.where(keep, x * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _dropout_add_kernel(acc_ptr, x_ptr, n, p, scale, seed, BLOCK: tl.constexpr):
        # acc += dropout(x): the LoRA branch's input gradient added into the base one.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        acc = tl.load(acc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        keep = tl.rand(seed, offs) >= p
        acc += tl.where(keep, x * scale, 0.0)
        tl.store(acc_ptr + offs, acc.to(acc_ptr.dtype.element_ty), mask=inside)


def new_seed() -> int:
    """A dropout seed from torch's CPU generator (no GPU sync; checkpoint recompute replays it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """The reference path's keep-mask (bool) for ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """``x * mask / (1 - p)`` (a new tensor, same dtype); the mask is a function of ``seed``."""
    scale = 1.0 / (1.0 - p)
    x = x.contiguous()
    if use_triton(x):
        out = torch.empty_like(x)
        n = x.numel()
        _dropout_kernel[grid_1d(n, _BLOCK)](x, out, n, p, scale, seed, BLOCK=_BLOCK)
        return out
    keep = dropout_mask(x.shape, p, seed, x.device)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


def dropout_add_(acc: Tensor, x: Tensor, p: float, seed: int) -> Tensor:
    """``acc += dropout(x, p, seed)`` in place (same mask as :func:`dropout` with that seed)."""
    if acc.shape != x.shape or not acc.is_contiguous():
        raise ValueError("dropout_add_ needs a contiguous acc of x's shape")
    scale = 1.0 / (1.0 - p)
    x = x.contiguous()
    if use_triton(acc, x):
        n = x.numel()
        _dropout_add_kernel[grid_1d(n, _BLOCK)](acc, x, n, p, scale, seed, BLOCK=_BLOCK)
        return acc
    return acc.add_(dropout(x, p, seed))
