"""Fused DoRA linear: ``out = g * (y - b + s * (x A^T) B^T) + b`` with ``g = m / ||W + s B A||``.

DoRA (weight-decomposed LoRA, Liu et al. 2024) rescales every output channel of the adapted
weight ``W + s B A`` to a learned magnitude ``m``. Shapes: ``x`` (N, in), ``W`` (out, in), ``b``
(out,), ``A`` = ``lora_A.weight`` (r, in), ``B`` = ``lora_B.weight`` (out, r), ``m`` =
``lora_magnitude_vector`` (out,), ``s`` the LoRA scale, ``n = ||W + s B A||`` the row norms
(out,), treated as a constant (no gradient flows through it: section 4.3 of the paper, as PEFT
does), ``y = x W^T + b`` the base layer's output, which the rewriter has already computed.
PEFT writes the same thing as ``y + (g - 1) * (y - b) + g * s * B(A(x))``.

Backward, with ``G = dOut`` (N, out), ``G' = G * g`` and ``z = (out - b) / g`` (the unscaled
adapted output, recovered from the saved output instead of saving a second (N, out) tensor)::

    dm  = sum_N(G * z) / n = sum_N(G * (out - b)) / m     (out,)
    T   = s * G' B                                         (N, r)
    dx  = G' W + T A         dA = T^T x         dB = s * G'^T U,   U = x A^T (saved)

so the gradient is LoRA's backward run on ``G'`` plus one column reduction; the base layer's own
backward is not run (``y`` gets no gradient: ``dx`` already holds ``G' W``), which needs a frozen
base (always so in LoRA training).

GPU path (Triton, 16-bit activations): the row norms in one pass over ``W`` without building
``B A`` (``_row_norm``); the forward epilogue ``(y - b + s U B^T) * g + b`` as one kernel reading
``y`` once (``_dora_out``); ``G'`` and the ``dm`` reduction in one pass over ``G`` and ``out``
(``_dora_grad``); ``U``, ``T``, ``dx``, ``dA``, ``dB`` by :mod:`splice.kernels.lora_kernels`. The
norms are fp32 (PEFT rounds them to the activations' dtype). Elsewhere the same function runs on
PyTorch ops; :func:`dora_linear_reference` is PEFT's formula in plain autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import HAS_TRITON, use_triton
from .lora_kernels import lora_down, lora_dx_add_, tn_reduce
from .lora_linear import LORA_KERNEL_MIN_TOKENS

__all__ = ["dora_linear", "dora_linear_reference", "dora_weight_norm", "dora_weight_norm_reference"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_norm(w_ptr, a_ptr, b_ptr, n_ptr, M, K, R, scale,
                  BO: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
        """n[o] = ||W[o, :] + s * B[o, :] A||, one block of rows per program, ``B A`` in registers."""
        rows = tl.program_id(0).to(tl.int64) * BO + tl.arange(0, BO)
        rr = tl.arange(0, RP)
        b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=(rows[:, None] < M) & (rr[None, :] < R),
                    other=0.0)
        acc = tl.zeros((BO,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :],
                        mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K),
                        other=0.0)
            v = w + scale * tl.dot(b, a, input_precision="ieee")
            acc += tl.sum(v * v, axis=1)
        tl.store(n_ptr + rows, tl.sqrt(acc), mask=rows < M)

    @triton.jit
    def _dora_out(y_ptr, u_ptr, b_ptr, g_ptr, bias_ptr, out_ptr, N, M, R, scale,
                  BN: tl.constexpr, BO: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr):
        """out = (y - bias + s * U B^T) * g + bias for one (BN, BO) tile."""
        rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        cols = tl.program_id(1).to(tl.int64) * BO + tl.arange(0, BO)
        rr = tl.arange(0, RP)
        u = tl.load(u_ptr + rows[:, None] * R + rr[None, :], mask=(rows[:, None] < N) & (rr[None, :] < R),
                    other=0.0)
        bt = tl.load(b_ptr + cols[None, :] * R + rr[:, None], mask=(cols[None, :] < M) & (rr[:, None] < R),
                     other=0.0)
        inside = (rows[:, None] < N) & (cols[None, :] < M)
        offs = rows[:, None] * M + cols[None, :]
        z = tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        z += scale * tl.dot(u, bt, input_precision="ieee")
        g = tl.load(g_ptr + cols, mask=cols < M, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)
            out = (z - bias[None, :]) * g[None, :] + bias[None, :]
        else:
            out = z * g[None, :]
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _dora_grad(grad_ptr, out_ptr, g_ptr, bias_ptr, gp_ptr, colsum_ptr, N, M, n_per_split,
                   BN: tl.constexpr, BO: tl.constexpr, HAS_BIAS: tl.constexpr):
        """G' = G * g, and colsum += sum over this program's rows of G * (out - bias)."""
        cols = tl.program_id(0).to(tl.int64) * BO + tl.arange(0, BO)
        n_start = tl.program_id(1) * n_per_split
        n_stop = tl.minimum(n_start + n_per_split, N)
        g = tl.load(g_ptr + cols, mask=cols < M, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)
        acc = tl.zeros((BO,), dtype=tl.float32)
        for n0 in range(0, n_per_split, BN):
            rows = (n_start + n0 + tl.arange(0, BN)).to(tl.int64)
            inside = (rows[:, None] < n_stop) & (cols[None, :] < M)
            offs = rows[:, None] * M + cols[None, :]
            grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            out = tl.load(out_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            if HAS_BIAS:
                out = out - bias[None, :]
            acc += tl.sum(grad * out, axis=0)
            tl.store(gp_ptr + offs, (grad * g[None, :]).to(gp_ptr.dtype.element_ty), mask=inside)
        tl.atomic_add(colsum_ptr + cols, acc, mask=cols < M)


def _rp(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def dora_weight_norm_reference(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``||W + s B A||`` per output row (out,), fp32, no gradient. ``weight`` (out, in)."""
    with torch.no_grad():
        return torch.linalg.norm(weight.float() + scale * (lora_b.float() @ lora_a.float()), dim=1)


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """Row norms of ``W + s B A`` (out,) in fp32, detached; Triton on the GPU (``B A`` is never
    materialised: one pass over ``W``), else :func:`dora_weight_norm_reference`."""
    if not use_triton(weight, lora_a, lora_b):
        return dora_weight_norm_reference(weight, lora_a, lora_b, scale)
    o, k = weight.shape
    r = lora_a.shape[0]
    norm = torch.empty(o, dtype=torch.float32, device=weight.device)
    bo, bk = 32, 128
    with torch.no_grad():
        _row_norm[(triton.cdiv(o, bo),)](
            weight.contiguous(), lora_a.detach().float().contiguous(), lora_b.detach().float().contiguous(),
            norm, o, k, r, float(scale), BO=bo, BK=bk, RP=_rp(r), num_warps=4)
    return norm


def _uses_kernels(x2: Tensor, min_tokens: int) -> bool:
    return use_triton(x2) and x2.dtype in (torch.bfloat16, torch.float16) and x2.shape[0] >= min_tokens


def _epilogue(y2: Tensor, u: Tensor, lora_b: Tensor, g: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    n, o = y2.shape
    r = u.shape[1]
    out = torch.empty_like(y2)
    bn, bo = 64, 64
    _dora_out[(triton.cdiv(n, bn), triton.cdiv(o, bo))](
        y2, u, lora_b.float().contiguous(), g, bias if bias is not None else g, out, n, o, r, float(scale),
        BN=bn, BO=bo, RP=_rp(r), HAS_BIAS=bias is not None, num_warps=4)
    return out


def _grad_prologue(grad: Tensor, out: Tensor, g: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    n, o = grad.shape
    bn, bo = 32, 128
    blocks = triton.cdiv(o, bo)
    split = max(1, min(triton.cdiv(n, 4 * bn), 256 // blocks + 1))
    n_per_split = triton.cdiv(triton.cdiv(n, split), bn) * bn
    split = triton.cdiv(n, n_per_split)
    gp = torch.empty_like(grad)
    colsum = torch.zeros(o, dtype=torch.float32, device=grad.device)
    _dora_grad[(blocks, split)](grad, out, g, bias if bias is not None else g, gp, colsum, n, o, n_per_split,
                                BN=bn, BO=bo, HAS_BIAS=bias is not None, num_warps=4)
    return gp, colsum


class _DoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
        lora_b: Tensor, magnitude: Tensor, scale: float, min_tokens: int,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y2 = y.reshape(-1, y.shape[-1])  # (N, out)
        ctx.triton = _uses_kernels(x2, min_tokens)
        g = magnitude.detach().float() / dora_weight_norm(weight, lora_a, lora_b, scale)  # (out,)
        if ctx.triton:
            x2, y2 = x2.contiguous(), y2.contiguous()
            u = lora_down(x2, lora_a.float().contiguous())  # (N, r) fp32
            out = _epilogue(y2, u, lora_b, g, bias, scale)
        else:
            u = x2 @ lora_a.to(x2.dtype).T
            z = y2 if bias is None else y2 - bias.to(y2.dtype)
            z = z + scale * (u @ lora_b.to(x2.dtype).T)
            out = z * g.to(z.dtype)
            out = (out if bias is None else out + bias.to(out.dtype)).to(y2.dtype)
        ctx.save_for_backward(x2, weight, bias, lora_a, lora_b, magnitude, u, g, out)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(y.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, bias, lora_a, lora_b, magnitude, u, g, out = ctx.saved_tensors
        scale = ctx.scale
        need_x, _, _, _, need_a, need_b, need_m = ctx.needs_input_grad[:7]
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        bias32 = bias.float() if bias is not None else None
        if ctx.triton:
            gp, colsum = _grad_prologue(grad.contiguous(), out, g, bias32)
        else:
            gp = grad * g.to(grad.dtype)
            shifted = out.float() if bias32 is None else out.float() - bias32
            colsum = (grad.float() * shifted).sum(0)
        dm = (colsum / magnitude.detach().float()).to(magnitude.dtype) if need_m else None
        dx = da = db = None
        if ctx.triton:
            a32 = lora_a.float().contiguous()
            t = lora_down(gp, lora_b.float().t().contiguous(), alpha=scale)  # (N, r) fp32
            if need_x:
                dx = gp @ weight
                lora_dx_add_(dx, t, a32, 0.0, 0)
            if need_a:
                da = tn_reduce(t, x2).to(lora_a.dtype)
            if need_b:
                db = tn_reduce(u, gp, alpha=scale).t().to(lora_b.dtype)
        else:
            t = (gp @ lora_b.to(gp.dtype)) * scale  # (N, r)
            if need_x:
                dx = gp @ weight.to(gp.dtype) + t @ lora_a.to(gp.dtype)
            if need_a:
                da = (t.T.float() @ x2.float()).to(lora_a.dtype)
            if need_b:
                db = (gp.T.float() @ u.float()).mul_(scale).to(lora_b.dtype)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, None, None, None, da, db, dm, None, None


def dora_linear(
    x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    magnitude: Tensor, *, scale: float, min_tokens: int = LORA_KERNEL_MIN_TOKENS,
) -> Tensor:
    """DoRA's output from the base output ``y = x W^T + b`` as one autograd node (module doc).

    ``x``, ``y`` and ``weight`` share the compute dtype; ``lora_a``, ``lora_b``, ``magnitude`` may
    be fp32 master weights. The base must be frozen: ``y`` receives no gradient (``dx`` includes
    the base's ``G' W``). Calls with fewer than ``min_tokens`` rows (decode steps) run the
    PyTorch ops, where Triton's launch cost would dominate; the norm kernel runs either way.
    """
    if x.dtype != weight.dtype or y.dtype != weight.dtype:
        raise TypeError(f"dora_linear: x ({x.dtype}), y ({y.dtype}) and weight ({weight.dtype}) must share a dtype")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("dora_linear needs a frozen base layer (its weight and bias get no gradient)")
    return _DoraLinearFn.apply(x, y, weight, bias, lora_a, lora_b, magnitude, float(scale), int(min_tokens))


def dora_linear_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
    *, scale: float,
) -> Tensor:
    """PEFT's DoRA linear in plain autograd, in x's dtype: ``y + (g - 1)(y - b) + g s B(A(x))``."""
    base = F.linear(x, weight)
    lora_weight = (lora_b @ lora_a).to(x.dtype)
    norm = torch.linalg.norm(weight.to(x.dtype) + scale * lora_weight.detach(), dim=1).detach()
    g = (magnitude / norm).view(1, -1)
    lora = F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    out = base + (g - 1) * base + g * lora * scale
    return (out if bias is None else out + bias).to(x.dtype)
