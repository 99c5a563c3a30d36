"""Cross-entropy gradient written over the logits: two passes over a (c, V) block, in place.

Math, per row ``i`` of the logits ``z`` (c, V) with target ``y_i`` and scale ``s_i``::

    lse_i  = log sum_j exp(z_ij)                         (fp32)
    loss_i = lse_i - z_i[y_i]                            (fp32, returned; not scaled)
    g_ij   = s_i * (exp(z_ij - lse_i) - [j == y_i])      (fp32, stored over z in z's dtype)

so ``g`` is the gradient of ``sum_i s_i * loss_i`` wrt ``z``. The chunked linear + cross-entropy
(:mod:`splice.kernels.linear_cross_entropy`) feeds ``g`` straight into its two GEMMs (``g W`` and
``g^T x``); ``s_i`` carries the row's mean weight (1/n) and its ignore mask (0 for ignored rows).

Why a kernel: the PyTorch sequence (upcast to fp32, logsumexp, gather, subtract, exp, scatter,
scale, downcast) makes about eight full passes over an fp32 copy of the block; with V = 128,256
the block is 131 MB for 256 rows. The Triton kernel reads the 16-bit logits twice (an online
max / sum-exp pass, then the gradient pass) and writes them once, with no fp32 copy.

Shapes: ``logits`` (c, V) contiguous, fp16/bf16/fp32 (fp64: the reference, in fp64); ``targets``
(c,) int64 in [0, V); ``row_scale`` (c,) fp32 (fp64 for fp64 logits; a stride-0 expanded scalar
is fine). Nothing reads a tensor value on the
host, so a call can be captured in a CUDA graph. The Triton path runs one program per row and
walks V in blocks of up to ``_BLOCK`` columns, any V and any c (V is a compile-time constant: one
compile per vocabulary size); offsets are int64 (c * V may pass 2**31).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON, use_triton

__all__ = ["cross_entropy_grad_", "cross_entropy_grad_reference"]

_BLOCK = 4096  # columns per step; the row is streamed, so V is not bounded by registers
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    # V is a compile-time constant: one compile per vocabulary (fixed for a model), and the loops
    # get a constant trip count. It also keeps the kernel runnable in Triton 3.6's interpreter
    # under numpy >= 2.4, which cannot take a runtime loop bound (triton-lang/triton#9171).
    @triton.jit
    def _ce_grad_kernel(z_ptr, y_ptr, s_ptr, loss_ptr, s_stride, V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * V  # int64: row * V passes 2**31 for big chunks of a 128k vocab
        cols = tl.arange(0, BLOCK)
        # Read before pass 2 overwrites the row.
        y = tl.load(y_ptr + row)
        z_y = tl.load(base + y).to(tl.float32)
        # Pass 1: online max and sum of exp. One max per block (not per lane) keeps it to one exp
        # per element. m starts at -FLT_MAX, not -inf: a block of only -inf (padding, or masked
        # logits) then gives exp(-inf - m) = 0 and exp(m - m) = 1 instead of exp(-inf + inf) = NaN.
        m = -3.4028234663852886e38
        s = 0.0
        for start in range(0, V, BLOCK):
            offs = start + cols
            z = tl.load(base + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, lse - z_y)
        # Pass 2: the gradient, written over the logits in their dtype.
        scale = tl.load(s_ptr + row * s_stride)
        for start in range(0, V, BLOCK):
            offs = start + cols
            inside = offs < V
            z = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            g = tl.where(offs == y, p - 1.0, p) * scale
            tl.store(base + offs, g.to(z_ptr.dtype.element_ty), mask=inside)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def _check(logits: Tensor, targets: Tensor, row_scale: Tensor) -> None:
    if logits.dim() != 2 or not logits.is_contiguous() or logits.shape[1] < 1:
        raise ValueError(f"logits must be a contiguous (rows, vocab) matrix, got {tuple(logits.shape)}")
    if logits.dtype not in (*_FUSED_DTYPES, torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    rows = logits.shape[0]
    if targets.shape != (rows,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 ({rows},), got {targets.dtype} {tuple(targets.shape)}")
    acc = "float64" if logits.dtype == torch.float64 else "float32"
    if row_scale.shape != (rows,) or row_scale.dtype != getattr(torch, acc):
        raise ValueError(f"row_scale must be {acc} ({rows},), got {row_scale.dtype} {tuple(row_scale.shape)}")


def cross_entropy_grad_reference(logits: Tensor, targets: Tensor, row_scale: Tensor) -> Tensor:
    """PyTorch version of :func:`cross_entropy_grad_`: same math in fp32, same in-place result."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit: a copy; else in place
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    g = z.sub_(lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
    g.mul_(row_scale[:, None])
    if g is not logits:
        logits.copy_(g)
    return loss


def cross_entropy_grad_(logits: Tensor, targets: Tensor, row_scale: Tensor) -> Tensor:
    """Per-row cross-entropy ``lse(z_i) - z_i[y_i]`` (fp32 (c,)); overwrites ``logits`` with
    ``row_scale_i * (softmax(z_i) - onehot(y_i))`` in their dtype. Triton on GPU, else the reference.

    Targets must lie in [0, V) (not checked: that would read them on the host). No host syncs.
    """
    _check(logits, targets, row_scale)
    if logits.dtype == torch.float64 or not use_triton(logits, targets, row_scale):
        return cross_entropy_grad_reference(logits, targets, row_scale)
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(_BLOCK, triton.next_power_of_2(vocab))
    _ce_grad_kernel[(rows,)](logits, targets.contiguous(), row_scale, loss, row_scale.stride(0), V=vocab,
                             BLOCK=block, num_warps=_warps(block))
    return loss
