"""A decode GEMM for a few rows: ``y = add_to + x @ W^T`` streaming ``W`` once, in one launch.

Math and shapes: ``x`` (M, K) and ``W`` (N, K) bf16 / fp16 (``M`` at most :data:`MAX_ROWS`), ``add_to``
(M, N) or None; ``y[m, n] = add_to[m, n] + sum_k x[m, k] W[n, k]``, accumulated in fp32, rounded once to
``x``'s dtype. With ``out`` the result is written there (it may be ``add_to`` itself: the residual stream
updated in place, as the engine's decoder layer does).

Why: a decode step reads each weight once, so each projection is bounded by its bytes over the card's
bandwidth. For one to a few rows cuBLAS picks skinny tiles and, for the square and tall weights (o and down of
a Llama), a split-K GEMM plus a reduction kernel. In CUDA graphs on an H100 (``benchmarks/decode_gemm.py
--gemv``, 2026-12-06) cuBLAS took o (4096 x 4096) at M = 1 in 16.2 us against an 11.1 us floor; this kernel 13.8.

The kernel: program ``j`` owns ``BLOCK_N`` output features (all ``M`` rows, padded to 16, 32 or 64 for
``tl.dot``) and walks the whole K, loading ``(BLOCK_N, BLOCK_K)`` tiles of ``W`` with the next ones in flight
(``num_stages``) and ``x^T``'s ``(BLOCK_K, BLOCK_M)`` slice from L2. Small ``BLOCK_N`` makes enough programs
to keep every SM streaming without splitting K, so there is no second kernel and no workspace; the residual add
is the epilogue. Every program reads all of ``x``: at 32-64 rows that L2 traffic would outgrow the weight's, so
``split_k > 1`` cuts K into ranges whose fp32 partial sums (split, M, N) a second small kernel adds (with
``add_to``) and rounds: wider tiles, the same number of programs.
:func:`gemv_reference` is the plain PyTorch definition (fp32 accumulation), the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import HAS_TRITON, use_triton

__all__ = ["DECODE_ROWS", "MAX_ROWS", "GemvConfig", "decode_linear", "decode_rows", "default_config", "gemv",
           "gemv_applies", "gemv_reference"]

MAX_ROWS = 64  # rows of x one program serves (tl.dot's narrow side, padded to a power of two >= 16)
DECODE_ROWS = 16  # decode_linear's kernel rows for any weight: measured faster than cuBLAS up to here (module doc)
WIDE_ROWS, WIDE_WEIGHT = 32, 48 << 20  # and for weights of at least WIDE_WEIGHT elements (decode_rows)


@dataclass(frozen=True, kw_only=True)
class GemvConfig:
    """``block_n`` output features a program, ``block_k`` weight columns a step, ``split_k`` K ranges (1: none;
    module doc), Triton's warps and stages."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1


def default_config(n: int, k: int) -> GemvConfig:
    """The tiles for an ``(N, K)`` weight, as ``benchmarks/decode_gemm.py --gemv`` found best at the Llama-3-8B
    shapes for M = 1, 8, 16 (H100, 2026-12-06): 16 rows a program, 256 columns a step over 2 warps, 4 stages
    (q/k/v 19.3 us against cuBLAS's 20.3, o 13.8 against 16.2, down 40.5 against 43.0); 64 rows, 128 columns, 4
    warps for the widest weights (gate/up's 28,672 rows: 77.3 against 77.2; the head's 128,256: 330.6 against
    354.1). At M = 32 the sweep's best for the head, gate/up and down were these same tiles (:func:`decode_rows`)."""
    block_k = 256 if n < 16384 else 128
    block_k = min(block_k, max(16, 1 << (k - 1).bit_length()))
    if n >= 16384:
        return GemvConfig(block_n=64, block_k=block_k, num_warps=4, num_stages=4)
    return GemvConfig(block_n=16, block_k=block_k, num_warps=2, num_stages=4)


def decode_rows(weight: Tensor) -> int:
    """The most rows :func:`decode_linear` gives the kernel for ``weight``: :data:`DECODE_ROWS`, or 32 for the
    large weights. At M = 32 (H100, CUDA graphs, ``decode_gemm.py --gemv``, 2026-12-06) the kernel beat cuBLAS on
    the head (358.9 against 379.2 us), down (43.6 / 45.8) and gate/up (83.6 / 84.1) and lost on q/k/v (21.0 /
    20.7) and o (14.8 / 14.4); at M = 64 it won nowhere by more than 1%."""
    return WIDE_ROWS if weight.numel() >= WIDE_WEIGHT else DECODE_ROWS


def gemv_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`gemv` runs the kernel: Triton for these tensors, 16-bit, at most ``MAX_ROWS`` rows, both
    with unit stride along K."""
    return (use_triton(x, weight) and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and x.stride(1) == 1 and weight.stride(1) == 1)


def gemv_reference(x: Tensor, weight: Tensor, *, add_to: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``add_to + x @ W^T`` in plain PyTorch, accumulated in fp32, rounded once (module doc)."""
    y = x.float() @ weight.float().t()
    if add_to is not None:
        y += add_to.float()
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, add_ptr, out_ptr, part_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_am,
                     stride_om, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     ADD: tl.constexpr, SPLIT: tl.constexpr):
        # program (j, split): out[:, j*BLOCK_N : (j+1)*BLOCK_N] = add + x @ W[rows]^T over the split's K range,
        # acc (BLOCK_N, BLOCK_M) fp32; with SPLIT the fp32 partial goes to part[split] (the sum kernel finishes)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, BLOCK_M)
        row_ok, m_ok = rows < N, ms < M
        k_start = tl.program_id(1) * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < k_end
            # the weight streams through once; x (read by every program) should stay in L2
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            xt = tl.load(x_ptr + ms[None, :] * stride_xm + cols[:, None], mask=m_ok[None, :] & col_ok[:, None],
                         other=0.0, eviction_policy="evict_last")
            acc = tl.dot(w, xt, acc)
        inside = row_ok[:, None] & m_ok[None, :]
        if SPLIT:
            at = part_ptr + tl.program_id(1).to(tl.int64) * M * N + ms[None, :] * N + rows[:, None]
            tl.store(at, acc, mask=inside)
        else:
            if ADD:
                acc += tl.load(add_ptr + ms[None, :] * stride_am + rows[:, None], mask=inside, other=0.0).to(tl.float32)
            tl.store(out_ptr + ms[None, :] * stride_om + rows[:, None], acc.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _sum_splits_kernel(part_ptr, add_ptr, out_ptr, M, N, stride_am, stride_om, SPLITS: tl.constexpr,
                           ADD: tl.constexpr, BLOCK: tl.constexpr):
        # out[m, n] = sum_s part[s, m, n] (+ add[m, n]), rounded once: the split-K epilogue
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < M * N
        m, n = i // N, i % N
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            y += tl.load(part_ptr + s * M * N + i, mask=live, other=0.0)
        if ADD:
            y += tl.load(add_ptr + m * stride_am + n, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=live)


def gemv(x: Tensor, weight: Tensor, *, add_to: Tensor | None = None, out: Tensor | None = None,
         config: GemvConfig | None = None) -> Tensor:
    """``add_to + x @ W^T`` (module doc) for ``x`` (M, K) and ``weight`` (N, K): the kernel where
    :func:`gemv_applies`, else :func:`gemv_reference`. ``out`` (M, N), row-major: written in place (may be
    ``add_to``). Returns the result ((M, N) in x's dtype)."""
    m, k = x.shape
    n = weight.shape[0]
    for name, t in (("add_to", add_to), ("out", out)):
        if t is not None and (t.shape != (m, n) or t.stride(1) != 1):
            raise ValueError(f"gemv: {name} must be a row-major ({m}, {n}) tensor, got {tuple(t.shape)} "
                             f"with strides {t.stride()}")
    if not gemv_applies(x, weight):
        return gemv_reference(x, weight, add_to=add_to, out=out)
    cfg = config or default_config(n, k)
    if cfg.split_k < 1:
        raise ValueError(f"gemv: split_k must be at least 1, got {cfg.split_k}")
    result = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    added = add_to if add_to is not None else result  # never read without ADD
    k_steps = -(-k // cfg.block_k)
    k_split = -(-k_steps // cfg.split_k) * cfg.block_k  # columns a split, whole steps
    splits = -(-k // k_split)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else result
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x, weight, added, result, part, m, n, k, k_split, x.stride(0), weight.stride(0), added.stride(0),
        result.stride(0), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=max(16, 1 << (m - 1).bit_length()),
        ADD=add_to is not None, SPLIT=splits > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](part, added, result, m, n, added.stride(0), result.stride(0),
                                                         SPLITS=splits, ADD=add_to is not None, BLOCK=block)
    return result


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  accumulate: Tensor | None = None) -> Tensor:
    """A plain linear of the engine's decode: ``x W^T + bias`` for ``x`` (..., K), or with ``accumulate``
    (..., N), contiguous: ``accumulate += x W^T`` in place, returned (the residual stream). :func:`gemv` for at
    most :func:`decode_rows` rows of 16-bit activations and no bias (faster than cuBLAS there: module doc,
    :func:`default_config`); else cuBLAS (``F.linear``, ``addmm_``)."""
    x2 = x.reshape(-1, x.shape[-1])
    flat = None if accumulate is None else accumulate.view(x2.shape[0], -1)
    if bias is None and x2.shape[0] <= decode_rows(weight) and gemv_applies(x2, weight):
        y = gemv(x2, weight, add_to=flat, out=flat)
    elif flat is None:
        y = F.linear(x2, weight, bias)
    else:
        y = flat.addmm_(x2, weight.t()) if bias is None else flat.addmm_(x2, weight.t()).add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])
