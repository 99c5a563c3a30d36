"""Fused NF4 GEMV / small-M GEMM: ``y = x @ dequant(W)^T (+ bias)`` straight from the 4-bit codes.

Math and shapes: ``x`` is ``(..., K)`` (bf16 / fp16 / fp32, ``M`` rows once flattened), ``W`` an
``(N, K)`` NF4 weight in bitsandbytes' layout (:mod:`splice.kernels.nf4`: the flat row-major weight
cut into blocks of ``block_size`` values, ``w[j] = NF4[c[j]] * absmax[j // block_size]``, two codes
a byte with the even one in the high nibble, the absmax fp32 or double-quantized), ``bias`` ``(N,)``::

    y[m, n] = sum_k x[m, k] * NF4[c[n * K + k]] * absmax[(n * K + k) // block_size]  (+ bias[n])

``y`` is ``(..., N)`` in ``x``'s dtype. ``K`` must be a multiple of the (power-of-two, >= 8) block
size, so no block straddles two rows and a block is whole int32 words of 8 codes.

Why: at decode a linear sees a handful of rows, the matmul is bound by the bytes of the weight, and
dequantize-then-cuBLAS moves ~4.5 bytes a weight (0.5 read, 2 written, 2 read back) where the
4-bit weight itself is ~0.52. These kernels read the packed codes and block statistics once and
never write a float weight, so a decode step reads a quarter of a bf16 model's bytes.

Both Triton kernels stream a ``(BLOCK_N, NB, WPB)`` tile of int32 words a K step (``NB`` whole
blocks of ``WPB = block_size / 8`` words per weight row, 16-byte loads; the next step's words,
block statistics and activations are loaded before this step's arithmetic, so two steps' loads are
in flight). Once the bytes stream, decoding is the cost: a 16-way lookup per weight. The compiler's
lookup (extract, mask, 64-bit address, load) is ~5 instructions a weight; the inline PTX of
:func:`splice.kernels.nf4_gemv2.levels` does it in 2-3 (``lut="shfl"``: every lane holds one of the 16 levels and ``shfl.idx`` fetches the level a
code names, the word only shifted; ``lut="ldg"``: one ``prmt`` writes the code into the table
address's low byte, one L1 load), so decoding can keep pace with reading 3.6x fewer bytes than bf16.

* ``gemv`` (one row of ``x`` a program, for ``M == 1``): fp32 FMAs of the 8 levels of each word
  against ``x``'s 8 columns, times the block's absmax once per word, accumulated elementwise in
  registers (one cross-thread reduction, at the end); programs tile ``N`` by ``BLOCK_N`` rows.
* ``dot`` (any ``M``, one program per ``BLOCK_M`` = 16..64 rows of ``x``): the levels of the tile in
  ``x``'s dtype, the 8 columns of each word interleaved back by joins, and ``tl.dot`` against
  ``x^T`` (``(BLOCK_K, BLOCK_M)``): the weight rows are the MMA's wide side, the few activation rows
  its narrow one. With one block a step (``NB == 1``) the block's absmax scales the dot's
  ``(BLOCK_N, BLOCK_M)`` result (one multiply per output, not per weight; the levels rounded to
  ``x``'s dtype, the reference rounds level x absmax: both within half an ulp of ``x``'s dtype);
  with several, the fp32 products level x absmax are rounded once, as the reference does. fp32
  ``x`` uses IEEE dots.

* ``gemv2`` (:mod:`splice.kernels.nf4_gemv2`, up to 4 rows of ``x`` a program): a thread owns whole
  blocks of a few weight rows and x arrives in the codes' own layout (no shared memory in the loop);
  per weight one shuffle and one fp32 FMA. The default for one row of x with 32- or 64-value blocks (H200: 1.2-1.5x
  the gemv kernel on every Llama-3-8B shape); also selectable by config up to 4 rows. :func:`nf4_linear_group`
  runs it over 2-3 sibling weights (q/k/v, gate/up) in one launch.

``split_k > 1`` cuts K into that many ranges: each writes an fp32 partial sum and one small kernel
adds them (and the bias) and casts: more programs for weights with few rows. Nothing syncs with
the host and every size is a host int, so a CUDA graph can capture the call.
:func:`nf4_linear_reference` (dequantize, then ``F.linear``) is the plain PyTorch definition;
:func:`nf4_linear` runs it where the kernels do not apply.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels import HAS_TRITON, as_rows, use_triton
from splice.kernels.nf4 import dequantize_absmax_reference, dequantize_nf4, dequantize_nf4_reference
from splice.kernels.nf4_gemv2 import gemv2_supports, launch_gemv2

__all__ = ["GemvConfig", "NF4Parts", "default_config", "gemv2_config", "gemv_applies", "k_splits", "nf4_linear",
           "nf4_linear_group", "nf4_linear_reference"]

class NF4Parts(Protocol):
    """One NF4 weight's tensors (:class:`splice.quant.nf4.NF4Tensor` has them): ``weight_shape`` (N, K)."""

    packed: Tensor
    code: Tensor
    absmax: Tensor | None
    qabsmax: Tensor | None
    scale2: Tensor | None
    offset: Tensor | None
    code2: Tensor | None
    weight_shape: tuple[int, int]
    block_size: int


_MAX_BLOCK_M = 64  # rows of x one dot program covers: beyond, the weight is decoded once per 64 rows


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of one call. ``kernel``: ``"gemv"``, ``"dot"`` (module doc) or ``"gemv2"``
    (:mod:`splice.kernels.nf4_gemv2`: up to 4 rows of x a program; ``block_k / block size`` a power of
    two, ideally ``>= 32 * num_warps``; ``"shfl"`` or ``"plain"`` only; block sizes other than 32 / 64
    run ``"gemv"``); ``block_n`` weight rows per program; ``block_k`` weight columns per K step (a
    multiple of the block size); ``split_k`` K ranges summed afterwards (1: none); ``lut``: the level
    lookup, ``"shfl"``, ``"ldg"`` or ``"plain"`` (module doc; Triton's interpreter always runs
    ``"plain"``); ``num_warps`` / ``num_stages``: Triton's (gemv2: 1, each step loads then computes, or 2, the next
    step's codes loaded into registers before this step's arithmetic, where a K split has several steps)."""

    kernel: str
    block_n: int
    block_k: int
    split_k: int = 1
    lut: str = "shfl"
    num_warps: int = 4
    num_stages: int = 1


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def k_splits(programs: int, k_steps: int, *, sms: int) -> int:
    """K splits (a power of two) that bring a grid of ``programs`` to ~2 programs an SM, keeping
    >= 4 K steps (of ``k_steps``) a split: a weight with few rows still streams on every SM."""
    split = 1
    while programs * split < 2 * sms and k_steps // (split * 2) >= 4:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, *, block_size: int, sms: int) -> GemvConfig:
    """The tiles for ``(M, N, K)`` on a device with ``sms`` SMs, as ``benchmarks/nf4_gemv.py``'s sweeps found best
    at the Llama-3-8B shapes (H200, 2026-12-06).

    The level lookup is ``shfl`` (module doc): with ordinary loads (``plain``) every shape took 1.4-2.7x as
    long. ``M == 1``: the gemv2 kernel (:func:`gemv2_config`) where it takes the blocks (32 or 64 values):
    q/o 8.4 us, k/v 4.1, gate/up 20.0, down 20.8 against the gemv kernel's 9.7 / 6.2 / 27.1 / 28.9 and bf16's
    12.7 / 6.8 / 31.3 / 31.4. Other block sizes: the gemv kernel, 16 weight rows a program (4 for a weight of
    fewer than 2,048 rows), 1,024 columns a K step over 8 warps for weights of at most 4,096 rows, else 512 over
    4, K split to fill the GPU (:func:`k_splits`). ``M > 1``: the dot kernel, one 64-value block a step, 128
    weight rows a program for the MLP's large weights (two pipeline stages from 8 rows), 64 for q/o and k/v:
    0.7-0.9x bf16 at M = 4-32 (gemv2 won only q/o and k/v at M = 4, by 5-14%)."""
    if m == 1 and gemv2_supports(n=n, k=k, block_size=block_size):
        return gemv2_config(m, n, k, block_size=block_size)
    if m == 1:
        block_n = 16 if n >= 2048 else 4
        block_k, warps = (1024, 8) if 2048 <= n <= 4096 else (512, 4)
        block_k = max(block_size, min(block_k, _pow2(k)))
        return GemvConfig(kernel="gemv", block_n=block_n, block_k=block_k, lut="shfl", num_warps=warps,
                          split_k=k_splits(-(-n // block_n), max(1, k // block_k), sms=sms))
    large = n >= 8192 or k >= 8192
    block_n = 128 if large else 64
    programs = -(-n // block_n) * -(-m // _MAX_BLOCK_M)
    return GemvConfig(kernel="dot", block_n=block_n, block_k=block_size, lut="shfl",
                      num_stages=2 if large and m >= 8 else 1, split_k=k_splits(programs, k // block_size, sms=sms))


def gemv2_config(m: int, n: int, k: int, *, block_size: int) -> GemvConfig:
    """The gemv2 kernel's tiles for ``(M <= 4, N, K)``, as ``benchmarks/nf4_gemv.py``'s sweep found best (H200,
    2026-12-06 and 2026-12-07): one block a lane over 2 warps (64 lanes: K of 4,096 in one step of 64-value blocks,
    14,336 in four), 8 weight rows a program for large products (``M x N x K`` of at least 2^25: gate/up, down,
    q/o at M = 4) and for weights of 4,096 rows or more (at M = 1: q/o 8.05 against 8.37 us with 4 rows, the
    grouped q/k/v 10.3 against 11.5), else 4; no K split (the measured tiles needed no rule for the grid's size);
    the next step's codes loaded into registers during this one's arithmetic (``num_stages=2``: down's four steps;
    it doubles the kernel's registers, 190 against 95, and halves its warps: H100 ncu, 2026-12-07)."""
    block_n, block_k = 8 if m * n * k >= 2**25 or n >= 4096 else 4, block_size * 64
    return GemvConfig(kernel="gemv2", block_n=block_n, block_k=block_k, lut="shfl", num_warps=2,
                      num_stages=2 if k > block_k else 1)


def gemv_applies(x: Tensor, *, shape: tuple[int, int], block_size: int) -> bool:
    """Whether :func:`nf4_linear` runs the Triton kernels for these activations and weight layout:
    Triton for ``x``'s device, a float dtype, and power-of-two blocks of whole int32 words (>= 8
    codes) that tile each row of ``W``."""
    k = shape[1]
    return (use_triton(x) and x.numel() > 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.shape[-1] == k and block_size >= 8 and block_size & (block_size - 1) == 0
            and k % block_size == 0)


def nf4_linear_reference(x: Tensor, packed: Tensor, code: Tensor, *, shape: tuple[int, int], block_size: int,
                         absmax: Tensor | None = None, qabsmax: Tensor | None = None,
                         scale2: Tensor | None = None, offset: Tensor | None = None,
                         code2: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``x @ dequant(W)^T + bias`` in plain PyTorch: the weight dequantized in ``x``'s dtype (fp32
    products of level and absmax, rounded once), then ``F.linear``."""
    if absmax is None:
        absmax = dequantize_absmax_reference(qabsmax, scale2, offset, code2)  # type: ignore[arg-type]
    w = dequantize_nf4_reference(packed, absmax, code, shape=shape, block_size=block_size, dtype=x.dtype)
    return F.linear(x, w, bias)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from splice.kernels.nf4_gemv2 import levels as _levels

    @triton.jit
    def _span(N, K, K_SPLIT, BLOCK_N: tl.constexpr, WPB: tl.constexpr):
        # this program's weight rows (axis 0 of the grid) and K split (axis 2), in blocks of a row:
        # rows (BLOCK_N,), their mask, blocks a row, and the split's blocks [first, end)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_blocks = K // (8 * WPB)
        first = tl.program_id(2) * (K_SPLIT // (8 * WPB))
        return rows, rows < N, k_blocks, first, tl.minimum(first + K_SPLIT // (8 * WPB), k_blocks)

    @triton.jit
    def _load_step(rows, row_live, kb, k_blocks, end, words_ptr, absmax_ptr, qabsmax_ptr, WPB: tl.constexpr,
                   DOUBLE: tl.constexpr):
        # the loads of blocks kb (NB,) of rows (BLOCK_N,), 0 past the split's end: the codes as int32
        # words (8 codes each) (BLOCK_N, NB, WPB), and the blocks' stored statistic (BLOCK_N, NB): the
        # fp32 absmax, or its 8-bit code (decoded by _absmax_of once it has arrived: a dependent
        # load issued with it would stall the step)
        live = row_live[:, None] & (kb < end)[None, :]
        block = rows.to(tl.int64)[:, None] * k_blocks + kb[None, :]
        word = block[:, :, None] * WPB + tl.arange(0, WPB)[None, None, :]
        # the weight streams through once; x (re-read by every program) should stay in L1 / L2 instead
        words = tl.load(words_ptr + word, mask=live[:, :, None], other=0, eviction_policy="evict_first")
        if DOUBLE:
            stat = tl.load(qabsmax_ptr + block, mask=live, other=0, eviction_policy="evict_first").to(tl.int32)
        else:
            stat = tl.load(absmax_ptr + block, mask=live, other=0.0, eviction_policy="evict_first")
        return words, stat

    @triton.jit
    def _absmax_of(stat, rows, kb, k_blocks, scale2_ptr, offset_ptr, code2_ptr, DOUBLE: tl.constexpr):
        # (BLOCK_N, NB) fp32 absmax from _load_step's statistic: code2[q] * scale2[block // 256] +
        # offset when double-quantized (splice.kernels.nf4's formula), else the absmax itself
        if DOUBLE:
            block = rows.to(tl.int64)[:, None] * k_blocks + kb[None, :]
            absmax = tl.load(code2_ptr + stat) * tl.load(scale2_ptr + block // 256) + tl.load(offset_ptr)
        else:
            absmax = stat
        return absmax

    @triton.jit
    def _columns8(x, NB: tl.constexpr, WPB: tl.constexpr):
        # (NB, WPB, 8) -> its 8 columns (NB, WPB), in order (splits of an in-register dimension: no data moves)
        even, odd = tl.split(tl.reshape(x, (NB, WPB, 2, 2, 2)))  # (NB, WPB, a, b): column 4a + 2b (+ 1)
        e0, e1 = tl.split(even)
        o0, o1 = tl.split(odd)
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _interleave8(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # the inverse of _columns8: 8 (BLOCK_N, NB, WPB) tensors -> (BLOCK_N, BLOCK_K), column 8t + j from
        # v_j's word t (tl.join adds the fastest dimension last, so the column's bits are joined from
        # the slowest, 4, to the fastest, 1)
        a0, a1, a2, a3 = tl.join(v0, v4), tl.join(v1, v5), tl.join(v2, v6), tl.join(v3, v7)
        return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), (BLOCK_N, BLOCK_K))

    @triton.jit
    def _x_step(x_row, kb, end, WPB: tl.constexpr):
        # x's columns of blocks kb (NB,) (NB, WPB, 8): word t's 8 columns side by side, 0 past the end
        cols = kb[:, None, None] * (8 * WPB) + 8 * tl.arange(0, WPB)[None, :, None] + tl.arange(0, 8)[None, None, :]
        return tl.load(x_row + cols, mask=(kb < end)[:, None, None], other=0.0, eviction_policy="evict_last")

    @triton.jit
    def _nf4_gemv_kernel(x_ptr, words_ptr, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code_ptr,
                         code2_ptr, bias_ptr, out_ptr, N, K, K_SPLIT, stride_xm, stride_os,
                         WPB: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, DOUBLE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, LUT: tl.constexpr):
        # program (n tile, row m of x, K split): out[split, m, rows] = x[m] . W[rows] over the split
        m, split = tl.program_id(1).to(tl.int64), tl.program_id(2)
        rows, row_live, k_blocks, first, end = _span(N, K, K_SPLIT, BLOCK_N, WPB)
        x_row = x_ptr + m * stride_xm
        acc = tl.zeros((BLOCK_N, NB, WPB), dtype=tl.float32)
        kb = first + tl.arange(0, NB)
        words, stat = _load_step(rows, row_live, kb, k_blocks, end, words_ptr, absmax_ptr, qabsmax_ptr, WPB, DOUBLE)
        xs = _x_step(x_row, kb, end, WPB)
        for kb0 in range(first, end, NB):
            kb = kb0 + tl.arange(0, NB)  # this step's blocks; the next step's loads go out first
            words_next, stat_next = _load_step(rows, row_live, kb + NB, k_blocks, end, words_ptr, absmax_ptr,
                                               qabsmax_ptr, WPB, DOUBLE)
            xs_next = _x_step(x_row, kb + NB, end, WPB)
            v0, v1, v2, v3, v4, v5, v6, v7 = _levels(words, code_ptr, LUT)
            x0, x1, x2, x3, x4, x5, x6, x7 = _columns8(xs.to(tl.float32), NB, WPB)  # (NB, WPB) each
            dot8 = (v0 * x0[None] + v1 * x1[None] + v2 * x2[None] + v3 * x3[None]
                    + v4 * x4[None] + v5 * x5[None] + v6 * x6[None] + v7 * x7[None])
            absmax = _absmax_of(stat, rows, kb, k_blocks, scale2_ptr, offset_ptr, code2_ptr, DOUBLE)
            acc += dot8 * absmax[:, :, None]  # one multiply per word, not per weight
            words, stat, xs = words_next, stat_next, xs_next
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_live, other=0.0).to(tl.float32)
        tl.store(out_ptr + split * stride_os + m * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_live)

    @triton.jit
    def _xt_step(x_rows, m_live, kb0, end, BLOCK_K: tl.constexpr, COLS: tl.constexpr):
        # x^T's rows (the weight's columns) from block kb0 on: (BLOCK_K, BLOCK_M), 0 past the end / M
        col = kb0 * COLS + tl.arange(0, BLOCK_K)  # COLS: columns a block
        return tl.load(x_rows + col[:, None], mask=m_live[None, :] & (col < end * COLS)[:, None], other=0.0)

    @triton.jit
    def _nf4_dot_kernel(x_ptr, words_ptr, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code_ptr,
                        code2_ptr, bias_ptr, out_ptr, M, N, K, K_SPLIT, stride_xm, stride_os,
                        WPB: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                        DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, LUT: tl.constexpr,
                        PRECISION: tl.constexpr):
        # program (n tile, m tile, K split): out[split, ms, rows] = x[ms] @ W[rows]^T over the split,
        # computed as acc (BLOCK_N, BLOCK_M) = W_tile (BLOCK_N, BLOCK_K) @ x_tile^T (BLOCK_K, BLOCK_M)
        split = tl.program_id(2)
        rows, row_live, k_blocks, first, end = _span(N, K, K_SPLIT, BLOCK_N, WPB)
        ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_live = ms < M
        x_rows = x_ptr + ms.to(tl.int64)[None, :] * stride_xm  # (1, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        words, stat = _load_step(rows, row_live, first + tl.arange(0, NB), k_blocks, end, words_ptr, absmax_ptr,
                                 qabsmax_ptr, WPB, DOUBLE)
        xt = _xt_step(x_rows, m_live, first, end, NB * WPB * 8, 8 * WPB)
        for kb0 in range(first, end, NB):
            kb = kb0 + tl.arange(0, NB)  # this step's blocks; the next step's loads go out first
            words_next, stat_next = _load_step(rows, row_live, kb + NB, k_blocks, end, words_ptr, absmax_ptr,
                                               qabsmax_ptr, WPB, DOUBLE)
            xt_next = _xt_step(x_rows, m_live, kb0 + NB, end, NB * WPB * 8, 8 * WPB)
            v0, v1, v2, v3, v4, v5, v6, v7 = _levels(words, code_ptr, LUT)
            absmax = _absmax_of(stat, rows, kb, k_blocks, scale2_ptr, offset_ptr, code2_ptr, DOUBLE)
            if NB == 1:  # one block a step: the levels' dot, then its absmax (one multiply per output)
                w = _interleave8(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N, NB * WPB * 8)
                part = tl.dot(w.to(x_ptr.dtype.element_ty), xt, input_precision=PRECISION)
                acc += part * tl.reshape(absmax, (BLOCK_N, 1))
            else:  # the weight as the reference rounds it: fp32 level x absmax, cast once
                sc = absmax[:, :, None]
                w = _interleave8(v0 * sc, v1 * sc, v2 * sc, v3 * sc, v4 * sc, v5 * sc, v6 * sc, v7 * sc, BLOCK_N,
                                 NB * WPB * 8)
                acc = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc, input_precision=PRECISION)
            words, stat, xt = words_next, stat_next, xt_next
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_live, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + split * stride_os + ms.to(tl.int64)[None, :] * N + rows[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_live[:, None] & m_live[None, :])

    @triton.jit
    def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, total, N, SPLITS: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # out[i] = sum_s partial[s, i] (+ bias[i % N]), cast: the split-K epilogue, one pass
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = i < total
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            y += tl.load(partial_ptr + s * total + i, mask=live, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + i % N, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=live)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _stats(absmax: Tensor | None, qabsmax: Tensor | None, scale2: Tensor | None, offset: Tensor | None,
           code2: Tensor | None, dummy: Tensor) -> tuple[Tensor, ...]:
    """The kernels' (absmax, qabsmax, scale2, offset, code2) pointers: ``dummy`` for the unused ones."""
    if absmax is not None:
        return absmax, dummy, dummy, dummy, dummy
    if qabsmax is None or scale2 is None or offset is None or code2 is None:
        raise ValueError("nf4_linear: give absmax, or qabsmax, scale2, offset and code2")
    return dummy, qabsmax, scale2, offset, code2


def _lut(lut: str, code: Tensor) -> int:
    """The kernels' LUT switch for ``lut``: inline PTX only where it compiles for real (not in the
    interpreter), and ``"ldg"`` only for a 256-byte aligned table (a tensor of its own always is:
    its lookups write into the address's low byte); otherwise ``"shfl"`` / plain loads."""
    if os.environ.get("TRITON_INTERPRET") == "1" or lut == "plain":
        return 0
    return 1 if lut == "ldg" and code.data_ptr() % 256 == 0 else 2


def _launch(x2: Tensor, words: Tensor, code: Tensor, stats: tuple[Tensor, ...], bias: Tensor | None,
            out: Tensor, *, n: int, k: int, k_split: int, block_size: int, config: GemvConfig) -> None:
    """One kernel launch writing ``out`` (split, M, N): module doc. ``words``: the packed codes as int32."""
    lut = _lut(config.lut, code)
    if config.kernel == "gemv2":
        launch_gemv2(x2, words, code, stats, bias, out, n=n, k=k, k_split=k_split, block_size=block_size,
                     block_n=config.block_n, block_k=config.block_k, lut=lut, num_warps=config.num_warps,
                     prefetch=config.num_stages == 2)
        return
    m, nb = x2.shape[0], config.block_k // block_size
    common = dict(WPB=block_size // 8, NB=nb, BLOCK_N=config.block_n, DOUBLE=stats[0] is code,  # absmax unused
                  HAS_BIAS=bias is not None, LUT=lut, num_warps=config.num_warps, num_stages=config.num_stages)
    args = (x2, words, *stats[:4], code, stats[4], code if bias is None else bias, out)
    n_tiles = triton.cdiv(n, config.block_n)
    if config.kernel == "gemv":
        _nf4_gemv_kernel[(n_tiles, m, config.split_k)](*args, n, k, k_split, x2.stride(0), out.stride(0),
                                                       **common)
        return
    block_m = max(16, min(_pow2(m), _MAX_BLOCK_M))
    _nf4_dot_kernel[(n_tiles, triton.cdiv(m, block_m), config.split_k)](
        *args, m, n, k, k_split, x2.stride(0), out.stride(0),
        BLOCK_M=block_m, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", **common)


def _checked(config: GemvConfig, *, n: int, k: int, block_size: int) -> GemvConfig:
    """``config`` as the kernels can run it (tl.dot's smallest tile side is 16), or one clear error (gemv2: blocks
    of 32 or 64 values, a power of two of them a step)."""
    if (config.block_k % block_size or config.kernel not in ("gemv", "gemv2", "dot") or config.split_k < 1
            or config.lut not in ("shfl", "ldg", "plain")):
        raise ValueError(f"nf4_linear: {config} needs kernel 'gemv', 'gemv2' or 'dot', lut 'shfl', 'ldg' or "
                         f"'plain', split_k >= 1 and block_k a multiple of the block size {block_size}")
    if config.kernel == "gemv2":
        steps = config.block_k // block_size
        if config.lut == "ldg" or steps & (steps - 1) or config.num_stages not in (1, 2):
            raise ValueError(f"nf4_linear: {config}: gemv2 takes lut 'shfl' or 'plain', block_k / block size "
                             "a power of two and num_stages 1 or 2 (the next step's codes in registers)")
        if not gemv2_supports(n=n, k=k, block_size=block_size):
            raise ValueError(f"nf4_linear: {config}: gemv2 takes blocks of 32 or 64 values and under 2**31 packed "
                             f"words; this {n}x{k} weight has blocks of {block_size}: use kernel 'gemv'")
    if config.kernel == "dot":
        config = replace(config, block_n=max(16, config.block_n), block_k=max(16, config.block_k))
    return config


def nf4_linear(x: Tensor, packed: Tensor, code: Tensor, *, shape: tuple[int, int], block_size: int,
               absmax: Tensor | None = None, qabsmax: Tensor | None = None, scale2: Tensor | None = None,
               offset: Tensor | None = None, code2: Tensor | None = None, bias: Tensor | None = None,
               config: GemvConfig | None = None) -> Tensor:
    """``x @ dequant(W)^T + bias`` (module doc) for ``x`` ``(..., K)`` and the ``(N, K) = shape``
    NF4 weight (``packed``, the ``(16,)`` fp32 ``code`` table, and ``absmax`` or the
    double-quantized ``qabsmax``/``scale2``/``offset``/``code2``, all on ``x``'s device); ``(..., N)``
    in ``x``'s dtype. The Triton kernels where :func:`gemv_applies`, else dequantize + ``F.linear``.
    ``config``: tiles (default :func:`default_config`)."""
    n, k = shape
    stats = _stats(absmax, qabsmax, scale2, offset, code2, code)  # validates before any work
    # the kernels read the codes as int32 words: a 4-byte aligned packed tensor (its own always is)
    if not gemv_applies(x, shape=shape, block_size=block_size) or packed.data_ptr() % 4:
        w = dequantize_nf4(packed, code, shape=shape, block_size=block_size, dtype=x.dtype, absmax=absmax,
                           qabsmax=qabsmax, scale2=scale2, offset=offset, code2=code2)
        return F.linear(x, w, bias)
    x2, words = as_rows(x), packed.view(torch.int32)
    m = x2.shape[0]
    config = _checked(config or default_config(m, n, k, block_size=block_size, sms=_sms(x.device)),
                      n=n, k=k, block_size=block_size)
    k_steps = -(-k // config.block_k)
    k_split = -(-k_steps // config.split_k) * config.block_k  # columns per split, whole steps
    splits = -(-k // k_split)
    config = replace(config, split_k=splits)
    if splits == 1:
        out = torch.empty((1, m, n), dtype=x.dtype, device=x.device)
        _launch(x2, words, code, stats, bias, out, n=n, k=k, k_split=k_split, block_size=block_size,
                config=config)
        return out.view(*x.shape[:-1], n)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _launch(x2, words, code, stats, None, partial, n=n, k=k, k_split=k_split, block_size=block_size,
            config=config)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m * n, block),)](partial, code if bias is None else bias, y, m * n, n,
                                                     SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block)
    return y.view(*x.shape[:-1], n)


def nf4_linear_group(x: Tensor, weights: Sequence[NF4Parts], *, config: GemvConfig | None = None) -> Tensor | None:
    """``[x @ W_0^T | x @ W_1^T | ...]`` (..., N_0 + N_1 + ...) for 2 or 3 sibling NF4 weights (q/k/v, gate/up) in
    one gemv2 launch (a launch's ramp and tail paid once, as one GEMM over packed bf16 weights does), or None
    where that launch does not apply and the caller runs :func:`nf4_linear` per weight: one row of ``x``, the
    same K, block size (32 or 64) and quantization (double or not) for every weight, each boundary between them
    on a tile of :func:`gemv2_config` rows. The weights stay where they are: the kernel moves the first weight's
    pointers by each tile's element offsets to its own. ``config``: gemv2 tiles (default :func:`gemv2_config`)."""
    if not 2 <= len(weights) <= 3 or x.shape[-1] != weights[0].weight_shape[1] or x.numel() != x.shape[-1]:
        return None
    first = weights[0]
    k, block_size, double = first.weight_shape[1], first.block_size, first.absmax is None
    n = sum(w.weight_shape[0] for w in weights)
    if any(w.weight_shape[1] != k or w.block_size != block_size or (w.absmax is None) != double
           or w.packed.data_ptr() % 4 for w in weights) \
            or not gemv_applies(x, shape=(n, k), block_size=block_size) \
            or not gemv2_supports(n=n, k=k, block_size=block_size):
        return None
    config = _checked(config or gemv2_config(1, n, k, block_size=block_size), n=n, k=k, block_size=block_size)
    starts = [sum(w.weight_shape[0] for w in weights[:i]) for i in range(1, len(weights))]
    if any(start % config.block_n for start in starts):
        return None

    def tensors(w: NF4Parts) -> tuple[Tensor | None, ...]:  # the kernel's order: words, absmax or qabsmax,
        # scale2, offset, code, code2
        words = w.packed.view(torch.int32)
        return (words, w.qabsmax, w.scale2, w.offset, w.code, w.code2) if double else (words, w.absmax, None,
                                                                                       None, w.code, None)

    def offset(t: Tensor | None, base: Tensor | None) -> int | None:  # t's first element in base's elements
        if t is None or base is None:
            return 0
        gap = t.data_ptr() - base.data_ptr()
        return None if t.dtype != base.dtype or gap % t.element_size() else gap // t.element_size()

    base = tensors(first)
    group = [[start, *(offset(t, b) for t, b in zip(tensors(w), base, strict=True))]
             for start, w in zip(starts, weights[1:], strict=True)]
    if any(d is None for member in group for d in member):
        return None
    stats = _stats(first.absmax, first.qabsmax, first.scale2, first.offset, first.code2, first.code)
    out = torch.empty((1, 1, n), dtype=x.dtype, device=x.device)
    launch_gemv2(as_rows(x), first.packed.view(torch.int32), first.code, stats, None, out, n=n, k=k,
                 k_split=-(-k // config.block_k) * config.block_k, block_size=block_size, block_n=config.block_n,
                 block_k=config.block_k, lut=_lut(config.lut, first.code), num_warps=config.num_warps,
                 group=group, prefetch=config.num_stages == 2)  # type: ignore[arg-type]
    return out.view(*x.shape[:-1], n)
