"""Fused SwiGLU: ``h = silu(g) * u`` in one pass, its backward in one pass.

Math (``g`` = gate projection, ``u`` = up projection, same shape; ``σ`` the sigmoid)::

    h  = g σ(g) u
    dg = dh u σ(g) (1 + g (1 - σ(g)))
    du = dh g σ(g)

Computed in fp32, rounded once to the inputs' dtype (Hugging Face rounds twice: after ``silu``
and after the product). Saved: ``g`` and ``u`` only; ``silu(g)`` is recomputed in backward.
With ``inplace_backward`` the gradients overwrite the saved ``g``/``u`` buffers (no new
allocations: two (N, intermediate) tensors less at the backward peak); only safe when nothing
else reads ``g``/``u`` afterwards, as in the MLP, so it is off by default.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import HAS_TRITON, grid_1d, use_triton

__all__ = ["swiglu", "swiglu_packed", "swiglu_reference"]

_BLOCK = 2048
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        dh = tl.load(dh_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=inside)
        tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=inside)


    @triton.jit
    def _swiglu_packed_fwd(gu_ptr, h_ptr, width, stride_row, BLOCK: tl.constexpr):
        # program (row, block of columns): g = gu[row, :width], u = gu[row, width:]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        g = tl.load(gu_ptr + row * stride_row + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_row + width + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * width + cols, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=inside)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: Tensor, u: Tensor, inplace_backward: bool) -> Tensor:
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        n = g.numel()
        _swiglu_fwd[grid_1d(n, _BLOCK)](g, u, h, n, BLOCK=_BLOCK, num_warps=8)
        ctx.save_for_backward(g, u)
        ctx.inplace = inplace_backward
        return h

    @staticmethod
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor | None, ...]:
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = (g, u) if ctx.inplace else (torch.empty_like(g), torch.empty_like(u))
        n = g.numel()
        _swiglu_bwd[grid_1d(n, _BLOCK)](dh, g, u, dg, du, n, BLOCK=_BLOCK, num_warps=8)
        return dg, du, None


def swiglu_reference(g: Tensor, u: Tensor) -> Tensor:
    """Hugging Face's ``act_fn(gate) * up`` with ``act_fn = silu``."""
    return F.silu(g) * u


def swiglu(g: Tensor, u: Tensor, *, inplace_backward: bool = False) -> Tensor:
    """``silu(g) * u``: Triton on GPU, the reference elsewhere."""
    fused = (
        use_triton(g, u)
        and g.shape == u.shape
        and g.dtype == u.dtype
        and g.dtype in _FUSED_DTYPES
        and g.numel() > 0
    )
    if not fused:
        return swiglu_reference(g, u)
    return _SwiGLUFn.apply(g, u, bool(inplace_backward))


def swiglu_packed(gu: Tensor) -> Tensor:
    """``silu(g) * u`` of a packed gate/up output ``gu`` (..., 2I) = [g | u] -> (..., I): one Triton
    launch reading both halves in place (no split copies) for CUDA tensors without autograd (the
    generation engine's packed MLP); the reference, differentiable, otherwise."""
    width = gu.shape[-1] // 2
    g, u = gu[..., :width], gu[..., width:]
    fused = (use_triton(gu) and gu.dtype in _FUSED_DTYPES and gu.shape[-1] % 2 == 0 and gu.numel() > 0
             and gu.stride(-1) == 1 and not (torch.is_grad_enabled() and gu.requires_grad))
    if not fused:
        return swiglu_reference(g, u)
    rows = gu.reshape(-1, gu.shape[-1])  # a view for the (T, 1, 2I) and (T, 2I) layouts of the engine
    h = torch.empty(*gu.shape[:-1], width, device=gu.device, dtype=gu.dtype)
    block = 1024
    _swiglu_packed_fwd[(rows.shape[0], -(-width // block))](rows, h, width, rows.stride(0), BLOCK=block, num_warps=4)
    return h
