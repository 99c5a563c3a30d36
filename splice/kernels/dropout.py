"""Seeded dropout whose mask is recomputed, never stored.

Math: ``out_i = x_i * m_i / (1 - p)`` with ``m_i = [u(keys, i) >= p]``, ``u`` uniform in [0, 1)
and ``i`` the element's index in the contiguous tensor. The mask is a pure function of
``(keys, i)``, so a backward pass (or a recompute under activation checkpointing) regenerates it
from the two 31-bit ``keys`` instead of saving a mask or the dropped-out copy of ``x``.

The keys live in a small int32 tensor on the activations' device, drawn by :func:`new_keys` from
torch's generator for that device: no GPU sync, and inside a captured CUDA graph
(:mod:`splice.training.graphs`) each replay draws fresh keys (a Python int seed would be frozen into the
graph). Kernels read them through a pointer. An int seed is still accepted for convenience
(:func:`as_keys` hashes it). A checkpointed layer records the keys its forward drew and hands
them back, in order, to its recompute (:func:`recording_keys`, :func:`replaying_keys`).

Triton path: ``u`` is a counter-based hash of ``i`` (murmur3's 32-bit finalizer over the index
mixed with the two keys): about a dozen integer operations per element, far cheaper than Philox,
so the mask can be regenerated inside memory-bound kernels (the fused LoRA kernels call
:func:`keep_mask` too, with the same element indices). Reference path (CPU, or CUDA without
Triton): ``torch.rand`` from a ``torch.Generator`` seeded with the keys. The two paths draw
different masks for the same keys; each is deterministic on its own, which is all the fused LoRA
linear needs (forward and backward take the same path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from . import HAS_TRITON, grid_1d, use_triton

__all__ = [
    "KeyTape", "as_keys", "dropout", "dropout_add_", "dropout_mask", "hash_keys", "new_keys",
    "recording_keys", "replaying_keys", "threshold",
]

_BLOCK = 2048
_M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash_keys(seed: int) -> tuple[int, int]:
    """Two 31-bit keys from an int seed (31 bits, so Triton always types them int32)."""
    return _fmix32(seed) >> 1, _fmix32(seed ^ 0x5BD1E995) >> 1


def threshold(p: float) -> int:
    """The Triton mask keeps ``i`` iff ``hash(i) >> 1 >= threshold(p)``."""
    return min(int(p * 2**31), 2**31 - 1)


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

    @triton.jit
    def load_keys(keys_ptr):
        """The two int32 keys of a mask (kernels take them by pointer: see the module doc)."""
        return tl.load(keys_ptr), tl.load(keys_ptr + 1)

    @triton.jit(do_not_specialize=["threshold"])
    def _dropout_kernel(x_ptr, out_ptr, n, keys_ptr, threshold, scale, BLOCK: tl.constexpr):
        k1, k2 = load_keys(keys_ptr)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(keep_mask(offs, k1, k2, threshold), x * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["threshold"])
    def _dropout_add_kernel(acc_ptr, x_ptr, n, keys_ptr, threshold, scale, BLOCK: tl.constexpr):
        # acc += dropout(x): the LoRA branch's input gradient added into the base one.
        k1, k2 = load_keys(keys_ptr)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        acc = tl.load(acc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        acc += tl.where(keep_mask(offs, k1, k2, threshold), x * scale, 0.0)
        tl.store(acc_ptr + offs, acc.to(acc_ptr.dtype.element_ty), mask=inside)


class KeyTape:
    """Keys drawn by one checkpointed forward, handed back in order to its recompute."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.position: int | None = None  # None: recording; an index: replaying

    def draw(self, device: torch.device) -> Tensor:
        if self.position is None:
            keys = _draw(device)
            self.keys.append(keys)
            return keys
        if self.position >= len(self.keys):
            raise RuntimeError("a checkpoint recompute drew more dropout keys than its forward did")
        self.position += 1
        return self.keys[self.position - 1]


# The tape being recorded or replayed. A checkpoint's recompute runs on autograd's thread and
# sets the tape there itself (inside its backward), so a context variable reaches it.
_TAPE: ContextVar[KeyTape | None] = ContextVar("splice_dropout_tape", default=None)


@contextlib.contextmanager
def _using(tape: KeyTape, position: int | None) -> Iterator[KeyTape]:
    tape.position = position
    token = _TAPE.set(tape)
    try:
        yield tape
    finally:
        _TAPE.reset(token)


def recording_keys(tape: KeyTape) -> contextlib.AbstractContextManager[KeyTape]:
    """Within this, :func:`new_keys` also appends what it draws to ``tape``."""
    return _using(tape, None)


def replaying_keys(tape: KeyTape) -> contextlib.AbstractContextManager[KeyTape]:
    """Within this, :func:`new_keys` returns ``tape``'s keys in the order they were drawn."""
    return _using(tape, 0)


def _draw(device: torch.device) -> Tensor:
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int32, device=device)


def new_keys(device: torch.device | str) -> Tensor:
    """Fresh mask keys, an int32 (2,) tensor on ``device`` drawn from torch's generator there
    (follows ``torch.manual_seed``; no GPU sync; fresh on every CUDA-graph replay)."""
    tape = _TAPE.get()
    device = torch.device(device)
    return tape.draw(device) if tape is not None else _draw(device)


def as_keys(keys: int | Tensor, device: torch.device) -> Tensor:
    """``keys`` as the int32 (2,) key tensor on ``device`` (an int seed is hashed)."""
    if isinstance(keys, Tensor):
        if keys.shape != (2,) or keys.dtype != torch.int32:
            raise ValueError(f"dropout keys must be an int32 tensor of shape (2,), got {keys.dtype} {tuple(keys.shape)}")
        return keys if keys.device == device else keys.to(device)
    return torch.tensor(hash_keys(int(keys)), dtype=torch.int32, device=device)


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, keys: int | Tensor,
                 device: torch.device) -> Tensor:
    """The reference path's keep-mask (bool) for ``keys``."""
    k1, k2 = (int(k) for k in as_keys(keys, torch.device("cpu")).tolist())
    gen = torch.Generator(device=device)
    gen.manual_seed((k1 << 31) | k2)
    return torch.rand(shape, generator=gen, device=device) >= p


def dropout(x: Tensor, p: float, keys: int | Tensor) -> Tensor:
    """``x * mask / (1 - p)`` (a new tensor, same dtype); the mask is a function of ``keys``."""
    scale = 1.0 / (1.0 - p)
    x = x.contiguous()
    if use_triton(x):
        out = torch.empty_like(x)
        n = x.numel()
        _dropout_kernel[grid_1d(n, _BLOCK)](x, out, n, as_keys(keys, x.device), threshold(p), scale,
                                            BLOCK=_BLOCK)
        return out
    keep = dropout_mask(x.shape, p, keys, x.device)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


def dropout_add_(acc: Tensor, x: Tensor, p: float, keys: int | Tensor) -> Tensor:
    """``acc += dropout(x, p, keys)`` in place (same mask as :func:`dropout` with those keys)."""
    if acc.shape != x.shape or not acc.is_contiguous():
        raise ValueError("dropout_add_ needs a contiguous acc of x's shape")
    scale = 1.0 / (1.0 - p)
    x = x.contiguous()
    if use_triton(acc, x):
        n = x.numel()
        _dropout_add_kernel[grid_1d(n, _BLOCK)](acc, x, n, as_keys(keys, x.device), threshold(p), scale,
                                                BLOCK=_BLOCK)
        return acc
    return acc.add_(dropout(x, p, keys))
