"""Seeded dropout whose mask is recomputed, never stored.

Math: ``out_i = x_i * m_i / (1 - p)`` with ``m_i = [u(seed, i) >= p]``, ``u`` uniform in [0, 1)
and ``i`` the element's index in the contiguous tensor. The mask is a pure function of
``(seed, i)``, so a backward pass (or a recompute under activation checkpointing) regenerates it
from the 31-bit ``seed`` instead of saving a mask or the dropped-out copy of ``x``.

Triton path: ``u`` is a counter-based hash of ``i`` (murmur3's 32-bit finalizer over the index
mixed with two keys derived from the seed): about a dozen integer operations per element, far
cheaper than Philox, so the mask can be regenerated inside memory-bound kernels (the fused LoRA
kernels call :func:`keep_mask` too, with the same element indices). Reference path (CPU, or CUDA
without Triton): ``torch.rand`` from a ``torch.Generator`` seeded with ``seed``. The two paths
draw different masks for the same seed; each is deterministic on its own, which is all the fused
LoRA linear needs (forward and backward take the same path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON, grid_1d, use_triton

__all__ = ["dropout", "dropout_add_", "dropout_mask", "hash_keys", "new_seed"]

_BLOCK = 2048
_M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash_keys(seed: int, p: float) -> tuple[int, int, int]:
    """(k1, k2, threshold) for the Triton mask: keep ``i`` iff ``hash(i) >> 1 >= threshold``.

    All three fit in 31 bits, so Triton always types them int32 (a key that sometimes needed
    int64 would compile a new kernel variant); kernels also skip specializing on their values.
    """
    return _fmix32(seed) >> 1, _fmix32(seed ^ 0x5BD1E995) >> 1, min(int(p * 2**31), 2**31 - 1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def keep_mask(offs, k1, k2, threshold):
        """Bool keep-mask for int64 element indices ``offs`` (murmur3 fmix32 of the mixed index)."""
        h = (offs.to(tl.uint32) ^ k1.to(tl.uint32)) * 0x9E3779B1 + k2.to(tl.uint32)
        h ^= (offs >> 32).to(tl.uint32) * 0x85EBCA77  # indices past 2**32 stay distinct
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return (h >> 1).to(tl.int32) >= threshold

    @triton.jit(do_not_specialize=["k1", "k2", "threshold"])
    def _dropout_kernel(x_ptr, out_ptr, n, k1, k2, threshold, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(keep_mask(offs, k1, k2, threshold), x * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["k1", "k2", "threshold"])
    def _dropout_add_kernel(acc_ptr, x_ptr, n, k1, k2, threshold, scale, BLOCK: tl.constexpr):
        # acc += dropout(x): the LoRA branch's input gradient added into the base one.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        acc = tl.load(acc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        acc += tl.where(keep_mask(offs, k1, k2, threshold), x * scale, 0.0)
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
        _dropout_kernel[grid_1d(n, _BLOCK)](x, out, n, *hash_keys(seed, p), scale, BLOCK=_BLOCK)
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
        _dropout_add_kernel[grid_1d(n, _BLOCK)](acc, x, n, *hash_keys(seed, p), scale, BLOCK=_BLOCK)
        return acc
    return acc.add_(dropout(x, p, seed))
