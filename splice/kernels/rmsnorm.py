"""Fused RMSNorm (Llama's): one pass forward, one pass backward, fp32 inside.

Math, per row ``x`` of length ``H`` (Hugging Face ``LlamaRMSNorm``)::

    r  = 1 / sqrt(mean(x^2) + eps)          (fp32)
    n  = round_to_x_dtype(x * r)
    y  = w * n                              (dtype: promote(w, x))

Backward (the rounding is treated as identity)::

    dn = dy * w
    dx = r * (dn - (x r) * mean(dn * x r))
    dw = sum_rows dy * n                    (only when w trains)

Saved: ``x`` and ``r`` (one fp32 per row). The Triton kernels handle one row per program with
the row in registers (``H`` up to 65,536); the reference is Hugging Face's formula verbatim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import HAS_TRITON, as_rows, use_triton

__all__ = ["rms_norm", "rms_norm_reference"]

_MAX_FUSED_H = 65536
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_fwd(x_ptr, w_ptr, y_ptr, r_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        n = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF rounds before the weight
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (n * w).to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(r_ptr + row, r)

    @triton.jit
    def _rms_bwd(dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, H, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < H
        dy = tl.load(dy_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row)
        dn = dy * w
        xhat = x * r
        c = tl.sum(dn * xhat, axis=0) / H
        dx = (dn - xhat * c) * r
        tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        shape = x.shape
        x2 = as_rows(x)  # (N, H)
        rows, h = x2.shape
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        r = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(h)
        _rms_fwd[(rows,)](x2, weight.contiguous(), y, r, h, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, r)
        ctx.shape = shape
        return y.view(*shape[:-1], h)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, r = ctx.saved_tensors
        rows, h = x2.shape
        dy2 = as_rows(dy)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x2)
            block = triton.next_power_of_2(h)
            _rms_bwd[(rows,)](dy2, x2, weight.contiguous(), r, dx, h, BLOCK=block, num_warps=_warps(block))
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            n = (x2.float() * r[:, None]).to(x2.dtype).float()
            dw = (dy2.float() * n).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face's ``LlamaRMSNorm.forward`` (fp32 inside; float64 inputs stay float64)."""
    input_dtype = x.dtype
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of the last dim of ``x`` times ``weight``: Triton on GPU, the reference elsewhere."""
    h = x.shape[-1]
    fused = (
        use_triton(x, weight)
        and x.dtype in _FUSED_DTYPES
        and weight.dtype in _FUSED_DTYPES
        and h <= _MAX_FUSED_H
        and weight.shape == (h,)
        and x.numel() > 0
    )
    if not fused:
        return rms_norm_reference(x, weight, eps)
    return _RMSNormFn.apply(x, weight, float(eps))
