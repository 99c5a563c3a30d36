"""Fused rotary position embedding (RoPE) for q and k, in the (batch, seq, heads, head_dim) layout.

Math (Hugging Face ``apply_rotary_pos_emb``; ``D`` = head_dim, ``h = D/2``, ``x = [x1, x2]``
split in halves, ``c``/``s`` the per-position cos/sin rows of length ``D``)::

    rotate_half(x) = [-x2, x1]
    out = x * c + rotate_half(x) * s  ->  out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2

The map is linear in ``x``, so the backward applies its transpose to ``dout``::

    dx1 = do1 c1 + do2 s2,   dx2 = do2 c2 - do1 s1

One Triton program per (batch, position) rotates every head of q (then of k) with that
position's cos/sin loaded once; fp32 inside, one rounding. Nothing is saved but ``cos``/``sin``
(shared by all layers). ``cos``/``sin`` are (B or 1, S, D), as Llama's rotary embedding returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import HAS_TRITON, use_triton

__all__ = ["rope", "rope_reference"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(
        x_ptr, out_ptr, cos_ptr, sin_ptr,
        S, n_heads, cos_b_stride, cos_s_stride,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # b * S + s
        b = row // S
        s = row % S
        d = tl.arange(0, HALF)
        cbase = b * cos_b_stride + s * cos_s_stride
        c1 = tl.load(cos_ptr + cbase + d).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + cbase + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + cbase + d).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + cbase + HALF + d).to(tl.float32)[None, :]
        h = tl.arange(0, BLOCK_H)[:, None]
        inside = h < n_heads
        offs = row * n_heads * (2 * HALF) + h * (2 * HALF) + d[None, :]  # (BLOCK_H, HALF)
        x1 = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offs + HALF, mask=inside, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(out_ptr + offs, o1.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(out_ptr + offs + HALF, o2.to(out_ptr.dtype.element_ty), mask=inside)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    """One launch: rotate every head of ``x`` (B, S, H, D), contiguous."""
    bsz, seq, heads, dim = x.shape
    out = torch.empty_like(x)
    cos_b_stride = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(bsz * seq,)](
        x, out, cos, sin, seq, heads, cos_b_stride, cos.stride(1),
        HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads), BACKWARD=backward, num_warps=4,
    )
    return out


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, output: bool) -> tuple[Tensor, Tensor]:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        if not output:  # values unread (see rope): the backward needs only cos and sin
            return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
                k, memory_format=torch.contiguous_format)
        return _rotate(q.contiguous(), cos, sin, False), _rotate(k.contiguous(), cos, sin, False)

    @staticmethod
    def backward(ctx: Any, dq: Tensor, dk: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        gq = _rotate(dq.contiguous(), cos, sin, True) if ctx.needs_input_grad[0] else None
        gk = _rotate(dk.contiguous(), cos, sin, True) if ctx.needs_input_grad[1] else None
        return gq, gk, None, None, None


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Hugging Face's formula for q (B, S, Hq, D), k (B, S, Hk, D), cos/sin (B|1, S, D)."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, output: bool = True) -> tuple[Tensor, Tensor]:
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) by cos/sin (B|1, S, D); new tensors, same layout.

    ``output=False``: the fused path returns uninitialised tensors with the same backward (for
    a checkpoint recompute that reuses the forward's attention and never reads them).
    """
    dim = q.shape[-1]
    fused = (
        use_triton(q, k, cos, sin)
        and q.dim() == 4
        and k.dim() == 4
        and q.dtype in _FUSED_DTYPES
        and q.dtype == k.dtype
        and dim == k.shape[-1]
        and dim % 2 == 0
        and (dim // 2) & (dim // 2 - 1) == 0  # a power-of-two half
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[1:] == (q.shape[1], dim)
        and cos.shape[0] in (1, q.shape[0])
        and not (cos.requires_grad or sin.requires_grad)
        and q.numel() > 0
    )
    if not fused:
        return rope_reference(q, k, cos, sin)
    return _RopeFn.apply(q, k, cos, sin, output)
