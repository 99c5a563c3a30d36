"""Seeded dropout whose mask is recomputed, never stored.

Math: ``out_i = x_i * m_i / (1 - p)`` with ``m_i = [u(keys, i) >= p]``, ``u`` uniform in [0, 1)
and ``i`` the element's (row, column) in ``x`` seen as a (rows, last dim) matrix. The mask is a pure
function of ``(keys, i)``, so a backward pass (or a recompute under activation checkpointing) regenerates it
from the two 31-bit ``keys`` instead of saving a mask or the dropped-out copy of ``x``.

The keys live in a small int32 tensor on the activations' device, drawn by :func:`new_keys` from
torch's generator for that device: no GPU sync, and inside a captured CUDA graph
(:mod:`splice.training.graphs`) each replay draws fresh keys (a Python int seed would be frozen into the
graph). Kernels read them through a pointer. An int seed is still accepted for convenience
(:func:`as_keys` hashes it). A checkpointed layer records the keys its forward drew and hands
them back, in order, to its recompute (:func:`recording_keys`, :func:`replaying_keys`).

Triton path: the mask is a counter-based hash of the element's (row, column). Each row and each
*pair* of adjacent columns gets a key (murmur3's 32-bit finalizer ``fmix32`` of its index mixed with
one of the keys); the pair's hash ``fmix32(row key + pair key)`` gives 32 bits, the low 16 for the even
column, the high 16 for the odd one, and an element is kept iff its 16 bits are at least
``threshold(p) = round(p * 2**16)``. So a mask costs about six integer operations an element (the row
and pair keys are computed once per tile row / column), cheap enough to regenerate inside
memory-bound kernels: the fused LoRA kernels call :func:`keep_mask` with the same (row, column)
indices. ``p`` is thereby rounded to a multiple of ``2**-16`` (the scale stays ``1 / (1 - p)``: a bias
below ``2**-17 / (1 - p)``). Reference path (CPU, or CUDA without Triton):
``torch.rand`` from a ``torch.Generator`` seeded with the keys. The two paths draw different masks for
the same keys; each is deterministic on its own, which is all the fused LoRA linear needs (forward and
backward take the same path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from . import HAS_TRITON, use_triton

__all__ = [
    "KeyTape", "as_keys", "dropout", "dropout_add_", "dropout_mask", "hash_keys", "new_keys",
    "recording_keys", "replaying_keys", "threshold",
]

_ROWS, _COLS = 8, 256  # one program's tile of the standalone kernels
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
    """The Triton mask keeps an element iff its 16 hash bits are at least ``threshold(p)``."""
    return min(round(p * 2**16), 2**16 - 1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fmix32_tl(h):  # _fmix32 on uint32 tensors
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def keep_mask(rows, col0, k1, k2, threshold, BK: tl.constexpr):
        """Bool keep-mask (len(rows), BK) of columns ``col0 .. col0 + BK - 1`` (``col0`` even) of ``rows``."""
        row_keys = _fmix32_tl(rows.to(tl.uint32) * 0x9E3779B1 ^ k1.to(tl.uint32))
        pairs = (col0 // 2 + tl.arange(0, BK // 2)).to(tl.uint32)
        pair_keys = _fmix32_tl(pairs * 0x85EBCA77 ^ k2.to(tl.uint32))
        h = _fmix32_tl(row_keys[:, None] + pair_keys[None, :])  # (len(rows), BK / 2): one hash a column pair
        return tl.interleave(h & 0xFFFF, h >> 16).to(tl.int32) >= threshold

    @triton.jit
    def load_keys(keys_ptr):
        """The two int32 keys of a mask (kernels take them by pointer: see the module doc)."""
        return tl.load(keys_ptr), tl.load(keys_ptr + 1)

    @triton.jit(do_not_specialize=["threshold"])
    def _dropout_kernel(x_ptr, acc_ptr, out_ptr, n_rows, n_cols, keys_ptr, threshold, scale,
                        ADD: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        # out = dropout(x), or with ADD acc += dropout(x) (the LoRA branch's input gradient added
        # into the base one); x, acc, out (n_rows, n_cols) contiguous
        k1, k2 = load_keys(keys_ptr)
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        col0 = tl.program_id(1) * BC
        cols = col0 + tl.arange(0, BC)
        offs = rows[:, None] * n_cols + cols[None, :]
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(keep_mask(rows, col0, k1, k2, threshold, BC), x * scale, 0.0)
        if ADD:
            y += tl.load(acc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    def _launch(x: Tensor, acc: Tensor | None, out: Tensor, p: float, keys: int | Tensor) -> None:
        n_cols = x.shape[-1] if x.dim() else 1
        n_rows = x.numel() // max(n_cols, 1)
        grid = (triton.cdiv(n_rows, _ROWS), triton.cdiv(n_cols, _COLS))
        _dropout_kernel[grid](x, out if acc is None else acc, out, n_rows, n_cols, as_keys(keys, x.device),
                              threshold(p), 1.0 / (1.0 - p), ADD=acc is not None, BR=_ROWS, BC=_COLS)


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
        if x.numel():
            _launch(x, None, out, p, keys)
        return out
    keep = dropout_mask(x.shape, p, keys, x.device)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


def dropout_add_(acc: Tensor, x: Tensor, p: float, keys: int | Tensor) -> Tensor:
    """``acc += dropout(x, p, keys)`` in place (same mask as :func:`dropout` with those keys)."""
    if acc.shape != x.shape or not acc.is_contiguous():
        raise ValueError("dropout_add_ needs a contiguous acc of x's shape")
    x = x.contiguous()
    if use_triton(acc, x):
        if x.numel():
            _launch(x, acc, acc, p, keys)
        return acc
    return acc.add_(dropout(x, p, keys))
