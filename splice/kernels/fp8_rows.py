"""The memory-bound passes of an FP8 linear's step: row-wise e4m3 quantization and the weight's transpose.

``quantize_rows(t, column_scale=c)``, for ``t`` (M, K) float and an optional ``c`` (K,), returns e4m3
codes ``q`` (M, K) (contiguous) and fp32 row scales ``a`` (M, 1) with ``t * c ~ q * a``::

    u     = round_t(t * round_t(c))           (the product in t's dtype, as ``t * c.to(t.dtype)``; u = t without c)
    amax  = max_k |u[m, k]|                   (fp32; an all-zero row takes 1e-12)
    inv   = round_w(round(1 / amax) * 448)    (w: bf16 for a bf16 t, else fp32; 448 is e4m3's largest value)
    q     = e4m3(round_w(u * inv)),  a = 1 / inv

``1 / amax`` is rounded before the product, as PyTorch computes ``448 / amax`` (a reciprocal, then a multiply).
Rounding ``inv`` to bf16 first keeps the product in bf16 (no fp32 copy of a bf16 ``t``) and makes ``a`` its
exact reciprocal; the product never passes 448 by more than bf16's rounding, which the e4m3 cast rounds back.
fp16 works in fp32: a multiplier of a row whose amax is under 448 / 65504 overflows fp16. The PyTorch
reference (:func:`quantize_rows_reference`) makes four passes over ``t`` (the column product, amax,
multiply, cast); the Triton kernel reads each row twice (the second read from L2) and writes the codes once.

``transpose(w)``, for a 2-D tensor of 1-byte elements (e4m3 codes), is ``w.t().contiguous()``: the FP8
GEMM reads its second operand contracted along the stored rows, so the input gradient needs ``q^T``
(:mod:`splice.quant.fp8`). PyTorch's strided copy of a 1-byte tensor is not vectorized; the kernel moves
64 x 64 tiles, coalesced on both sides.

On a CPU, or without Triton, both are the PyTorch reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON, use_triton

__all__ = ["quantize_rows", "quantize_rows_reference", "transpose"]

E4M3 = torch.float8_e4m3fn
_TINY = 1e-12  # an all-zero row gets this amax (its codes are all 0 whatever the scale)
_BLOCK = 2048  # row elements a loop iteration of the quantize kernel
_TILE = 64  # the transpose kernel's square tile

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_values(t_ptr, c_ptr, cols, inside, HAS_C: tl.constexpr):
        u = tl.load(t_ptr + cols, mask=inside, other=0.0)
        if HAS_C:  # torch's t * c.to(t.dtype): c rounded to t's dtype, the product rounded to it
            c = tl.load(c_ptr + cols, mask=inside, other=0.0).to(u.dtype).to(tl.float32)
            u = (u.to(tl.float32) * c).to(u.dtype)
        return u.to(tl.float32)

    @triton.jit
    def _quantize_rows_kernel(t_ptr, c_ptr, q_ptr, s_ptr, K, stride_t, TOP: tl.constexpr, TINY: tl.constexpr,
                              HAS_C: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t_row = t_ptr + row * stride_t
        peak = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < K
            peak = tl.maximum(peak, tl.abs(_row_values(t_row, c_ptr, cols, inside, HAS_C)))
        inv = tl.math.div_rn(1.0, tl.maximum(tl.max(peak, axis=0), TINY)) * TOP  # torch's 448 / amax
        if BF16:
            inv = inv.to(tl.bfloat16).to(tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < K
            v = _row_values(t_row, c_ptr, cols, inside, HAS_C) * inv
            if BF16:
                v = v.to(tl.bfloat16).to(tl.float32)
            tl.store(q_ptr + row * K + cols, v.to(q_ptr.dtype.element_ty), mask=inside)
        tl.store(s_ptr + row, tl.math.div_rn(1.0, inv))

    @triton.jit
    def _transpose_kernel(src_ptr, dst_ptr, R, C, TILE: tl.constexpr):
        rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
        cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
        inside = (rows[:, None] < R) & (cols[None, :] < C)
        tile = tl.load(src_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=inside)
        out = cols[:, None].to(tl.int64) * R + rows[None, :]
        tl.store(dst_ptr + out, tl.trans(tile), mask=tl.trans(inside))


def quantize_rows_reference(t: Tensor, *, column_scale: Tensor | None = None,
                            dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """The module doc's math in PyTorch: codes (M, K) of ``dtype`` and fp32 row scales (M, 1)."""
    if column_scale is not None:
        t = t * column_scale.to(t.dtype)
    top = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True).float()  # one read of t
    work = torch.float32 if t.dtype == torch.float16 else t.dtype
    inv = (top / amax.clamp(min=_TINY)).to(work)
    return (t.to(work) * inv).to(dtype), inv.float().reciprocal()


def quantize_rows(t: Tensor, *, column_scale: Tensor | None = None,
                  dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """``t`` (M, K) (its rows may be strided) times ``column_scale`` (K,) as e4m3 codes (M, K) and fp32 row
    scales (M, 1) (module doc): one Triton kernel on a GPU, else :func:`quantize_rows_reference`."""
    if (t.dim() != 2 or dtype != E4M3 or t.stride(-1) != 1 or not t.dtype.is_floating_point
            or t.dtype.itemsize == 1 or not use_triton(t)):
        return quantize_rows_reference(t, column_scale=column_scale, dtype=dtype)
    rows, k = t.shape
    codes = torch.empty((rows, k), dtype=dtype, device=t.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=t.device)
    if rows and k:
        c = column_scale.contiguous() if column_scale is not None else t  # (t: an unread placeholder)
        _quantize_rows_kernel[(rows,)](t, c, codes, scales, k, t.stride(0), TOP=torch.finfo(dtype).max, TINY=_TINY,
                                       HAS_C=column_scale is not None, BF16=t.dtype == torch.bfloat16,
                                       BLOCK=min(_BLOCK, triton.next_power_of_2(k)), num_warps=4)
    return codes, scales


def transpose(w: Tensor) -> Tensor:
    """``w.t().contiguous()`` for a contiguous 2-D ``w`` of 1-byte elements (module doc)."""
    if w.dim() != 2 or w.element_size() != 1 or not w.is_contiguous() or not use_triton(w):
        return w.t().contiguous()
    r, c = w.shape
    out = torch.empty((c, r), dtype=w.dtype, device=w.device)
    if w.numel():
        _transpose_kernel[(triton.cdiv(r, _TILE), triton.cdiv(c, _TILE))](
            w.view(torch.uint8), out.view(torch.uint8), r, c, TILE=_TILE)
    return out
