"""Fused NF4 GEMV / small-M GEMM: ``y = x @ dequant(W)^T (+ bias)`` straight from the 4-bit codes.

Math and shapes: ``x`` is ``(..., K)`` (bf16 / fp16 / fp32, ``M`` rows once flattened), ``W`` an
``(N, K)`` NF4 weight in bitsandbytes' layout (:mod:`splice.kernels.nf4`: the flat row-major weight
cut into blocks of ``block_size`` values, ``w[j] = NF4[c[j]] * absmax[j // block_size]``, two codes
a byte with the even one in the high nibble, the absmax fp32 or double-quantized), ``bias`` ``(N,)``::

    y[m, n] = sum_k x[m, k] * NF4[c[n * K + k]] * absmax[(n * K + k) // block_size]  (+ bias[n])

``y`` is ``(..., N)`` in ``x``'s dtype. ``K`` must be a multiple of the (power-of-two) block size, so
no block straddles two rows: the blocks of row ``n`` are ``n * K / block_size + (0, 1, ...)``.

Why: at decode a linear sees a handful of rows, the matmul is bound by the bytes of the weight, and
dequantize-then-cuBLAS moves ~4.5 bytes a weight (0.5 read, 2 written, 2 read back) where the
4-bit weight itself is ~0.53. These kernels read the packed codes and block statistics once and
never write a float weight, so batch-1 decode reads a quarter of a bf16 model's bytes.

Two Triton kernels share the tile decoding (``_decode_tile``: a ``(BLOCK_N, NB, HALF)`` tile of
packed bytes, ``NB`` whole blocks of ``HALF = block_size / 2`` bytes per row, the 16 NF4 levels
looked up from a 16-entry fp32 table that stays in L1, and the tile's ``(BLOCK_N, NB)`` absmax,
decoded from its 8-bit code when double-quantized):

* ``gemv`` (``M == 1``): one program per ``BLOCK_N`` rows (and per row of ``x``); fp32 FMAs of the
  high / low nibbles' levels against ``x``'s even / odd columns, summed per block and scaled by the
  block's absmax once (one multiply per block, not per weight).
* ``dot`` (``M > 1``): one program per ``BLOCK_N`` rows and ``BLOCK_M`` (16..64) rows of ``x``; the
  tile is dequantized to ``x``'s dtype (the reference's values exactly) and fed to ``tl.dot``, the even
  and odd columns as two dots of ``BLOCK_K / 2`` (no interleave); fp32 uses IEEE dots.

Enough programs come from small ``BLOCK_N`` (down to 4 rows) rather than split-K, whose partial sums
would cost a second kernel per linear; ``split_k > 1`` (a fp32 partial sum per split, reduced by
PyTorch) stays available for tuning. Nothing syncs with the host and every size is a host int, so
a CUDA graph can capture the call. :func:`nf4_linear_reference` (dequantize, then ``F.linear``) is
the plain PyTorch definition; :func:`nf4_linear` runs it where the kernels do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels import HAS_TRITON, as_rows, use_triton
from splice.kernels.nf4 import dequantize_absmax_reference, dequantize_nf4, dequantize_nf4_reference

__all__ = ["GemvConfig", "default_config", "gemv_applies", "nf4_linear", "nf4_linear_reference"]

_PROGRAMS_PER_SM = 4  # programs in flight per SM that keep enough loads outstanding to stream HBM
_TILE_BYTES = 4096  # packed bytes a gemv program decodes per K step (32 per thread at 4 warps)
_MAX_BLOCK_M = 64  # rows of x one dot program covers: beyond, the weight is decoded once per 64 rows


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of one call. ``kernel``: ``"gemv"`` or ``"dot"`` (module doc); ``block_n`` weight rows
    per program; ``block_k`` weight columns per K step (a multiple of the block size); ``split_k``
    K ranges reduced afterwards (1: none); ``num_warps``: Triton's."""

    kernel: str
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_config(m: int, n: int, k: int, *, block_size: int, sms: int) -> GemvConfig:
    """The tiles for ``(M, N, K)`` on a device with ``sms`` SMs: ``gemv`` for one row, ``dot`` for
    more; ``block_n`` halves (16 down to 4, or 32 down to 16) until the grid has ``_PROGRAMS_PER_SM`` programs
    an SM, and ``block_k`` grows so a step still decodes about ``_TILE_BYTES`` packed bytes."""
    gemv = m == 1
    block_n = 16 if gemv else 32
    # gemv: below 4 rows a program reads more of x (2 bytes a column, from L1/L2) than of W (0.5 a
    # column a row); dot: tl.dot needs >= 16 rows a side
    floor = 4 if gemv else 16
    m_tiles = m if gemv else -(-m // _MAX_BLOCK_M)
    while block_n > floor and -(-n // block_n) * m_tiles < _PROGRAMS_PER_SM * sms:
        block_n //= 2
    block_k = (2 * _TILE_BYTES // block_n) if gemv else 256
    block_k = max(block_size, min(block_k, _pow2(k)))
    return GemvConfig(kernel="gemv" if gemv else "dot", block_n=block_n, block_k=block_k)


def gemv_applies(x: Tensor, *, shape: tuple[int, int], block_size: int) -> bool:
    """Whether :func:`nf4_linear` runs the Triton kernels for these activations and weight layout:
    Triton for ``x``'s device, a float dtype, and power-of-two blocks that tile each row of ``W``."""
    k = shape[1]
    return (use_triton(x) and x.numel() > 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.shape[-1] == k and block_size >= 2 and block_size & (block_size - 1) == 0
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

    from splice.kernels.nf4 import _absmax

    @triton.jit
    def _decode_tile(rows, row_live, kb, k_blocks, k_blocks_end, packed_ptr, absmax_ptr, qabsmax_ptr,
                     scale2_ptr, offset_ptr, code_ptr, code2_ptr, HALF: tl.constexpr, DOUBLE: tl.constexpr):
        # rows (BLOCK_N,), kb (NB,) block indices within a row -> the high / low nibbles' NF4 levels
        # (BLOCK_N, NB, HALF) fp32 (values 2i and 2i + 1 of each block) and the absmax (BLOCK_N, NB).
        live = row_live[:, None] & (kb < k_blocks_end)[None, :]
        block = rows.to(tl.int64)[:, None] * k_blocks + kb[None, :]  # global block index
        byte = block[:, :, None] * HALF + tl.arange(0, HALF)[None, None, :]
        # the weight streams through once; x (re-read by every program) should stay in L1 instead
        bits = tl.load(packed_ptr + byte, mask=live[:, :, None], other=0, eviction_policy="evict_first").to(tl.int32)
        hi = tl.load(code_ptr + (bits >> 4))  # 16 fp32 levels: one cache line, no bank conflicts
        lo = tl.load(code_ptr + (bits & 0xF))
        absmax = _absmax(block, live, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code2_ptr, DOUBLE)
        return hi, lo, absmax

    @triton.jit
    def _x_pairs(x_ptr, offsets, mask, ROWS: tl.constexpr, HALF_COLS: tl.constexpr):
        # x at ``offsets`` (ROWS, 2 HALF_COLS) -> its even and odd columns (ROWS, HALF_COLS), read
        # contiguously (a stride-2 load would not vectorize)
        pairs = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last")
        return tl.split(tl.reshape(pairs, (ROWS, HALF_COLS, 2)))

    @triton.jit
    def _span(N, K, K_SPLIT, BLOCK_N: tl.constexpr, HALF: tl.constexpr):
        # this program's weight rows (axis 0 of the grid) and K split (axis 2), in blocks of a row:
        # rows (BLOCK_N,), their mask, blocks a row, and the split's blocks [first, end)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_blocks = K // (2 * HALF)
        first = tl.program_id(2) * (K_SPLIT // (2 * HALF))
        return rows, rows < N, k_blocks, first, tl.minimum(first + K_SPLIT // (2 * HALF), k_blocks)

    @triton.jit
    def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code_ptr,
                         code2_ptr, bias_ptr, out_ptr, N, K, K_SPLIT, stride_xm, stride_os,
                         HALF: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, DOUBLE: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
        # program (n tile, row m of x, K split): out[split, m, rows] = x[m] . W[rows] over the split
        m, split = tl.program_id(1).to(tl.int64), tl.program_id(2)
        rows, row_live, k_blocks, first, end = _span(N, K, K_SPLIT, BLOCK_N, HALF)
        acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        for kb0 in range(first, end, NB):
            kb = kb0 + tl.arange(0, NB)
            hi, lo, absmax = _decode_tile(rows, row_live, kb, k_blocks, end, packed_ptr, absmax_ptr, qabsmax_ptr,
                                          scale2_ptr, offset_ptr, code_ptr, code2_ptr, HALF, DOUBLE)
            col = kb[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]  # (NB, 2 HALF)
            xe, xo = _x_pairs(x_ptr + m * stride_xm, col, (kb < end)[:, None], NB, HALF)
            part = tl.sum(hi * xe.to(tl.float32)[None, :, :] + lo * xo.to(tl.float32)[None, :, :], axis=2)
            acc += part * absmax  # one multiply per block, not per weight
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_live, other=0.0).to(tl.float32)
        out = out_ptr + split * stride_os + m * N + rows
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=row_live)

    @triton.jit
    def _nf4_dot_kernel(x_ptr, packed_ptr, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code_ptr,
                        code2_ptr, bias_ptr, out_ptr, M, N, K, K_SPLIT, stride_xm, stride_os,
                        HALF: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                        DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        # program (n tile, m tile, K split): out[split, ms, rows] = x[ms] @ W[rows]^T over the split
        split = tl.program_id(2)
        rows, row_live, k_blocks, first, end = _span(N, K, K_SPLIT, BLOCK_N, HALF)
        ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_live = ms < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb0 in range(first, end, NB):
            kb = kb0 + tl.arange(0, NB)
            hi, lo, absmax = _decode_tile(rows, row_live, kb, k_blocks, end, packed_ptr, absmax_ptr, qabsmax_ptr,
                                          scale2_ptr, offset_ptr, code_ptr, code2_ptr, HALF, DOUBLE)
            # W's even / odd columns of the step, (BLOCK_N, NB * HALF), in x's dtype as the reference
            w_hi = tl.reshape(hi * absmax[:, :, None], (BLOCK_N, NB * HALF)).to(x_ptr.dtype.element_ty)
            w_lo = tl.reshape(lo * absmax[:, :, None], (BLOCK_N, NB * HALF)).to(x_ptr.dtype.element_ty)
            col = kb0 * (2 * HALF) + tl.arange(0, 2 * NB * HALF)  # (2 NB HALF,)
            live = m_live[:, None] & (col < end * (2 * HALF))[None, :]
            xe, xo = _x_pairs(x_ptr, ms.to(tl.int64)[:, None] * stride_xm + col[None, :], live, BLOCK_M,
                              NB * HALF)
            acc = tl.dot(xe, tl.trans(w_hi), acc, input_precision=PRECISION)
            acc = tl.dot(xo, tl.trans(w_lo), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_live, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + split * stride_os + ms.to(tl.int64)[:, None] * N + rows[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_live[:, None] & row_live[None, :])


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


def _launch(x2: Tensor, packed: Tensor, code: Tensor, stats: tuple[Tensor, ...], bias: Tensor | None,
            out: Tensor, *, n: int, k: int, k_split: int, block_size: int, config: GemvConfig) -> None:
    """One kernel launch writing ``out`` (split, M, N): module doc."""
    m, half, nb = x2.shape[0], block_size // 2, config.block_k // block_size
    common = dict(HALF=half, NB=nb, BLOCK_N=config.block_n, DOUBLE=stats[0] is code,  # absmax unused
                  HAS_BIAS=bias is not None, num_warps=config.num_warps)
    bias_arg = code if bias is None else bias
    stride_os = out.stride(0)
    n_tiles = triton.cdiv(n, config.block_n)
    if config.kernel == "gemv":
        _nf4_gemv_kernel[(n_tiles, m, config.split_k)](
            x2, packed, *stats[:4], code, stats[4], bias_arg, out, n, k, k_split, x2.stride(0), stride_os,
            **common)
        return
    block_m = max(16, min(_pow2(m), _MAX_BLOCK_M))
    _nf4_dot_kernel[(n_tiles, triton.cdiv(m, block_m), config.split_k)](
        x2, packed, *stats[:4], code, stats[4], bias_arg, out, m, n, k, k_split, x2.stride(0), stride_os,
        BLOCK_M=block_m, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", **common)


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
    if not gemv_applies(x, shape=shape, block_size=block_size):
        w = dequantize_nf4(packed, code, shape=shape, block_size=block_size, dtype=x.dtype, absmax=absmax,
                           qabsmax=qabsmax, scale2=scale2, offset=offset, code2=code2)
        return F.linear(x, w, bias)
    x2 = as_rows(x)
    m = x2.shape[0]
    config = config or default_config(m, n, k, block_size=block_size, sms=_sms(x.device))
    if config.block_k % block_size or config.kernel not in ("gemv", "dot"):
        raise ValueError(f"nf4_linear: {config} needs kernel 'gemv' or 'dot' and block_k a multiple of "
                         f"the block size {block_size}")
    if config.kernel == "dot" and config.block_n < 16:
        config = replace(config, block_n=16)  # tl.dot's smallest tile side
    k_steps = -(-k // config.block_k)
    k_split = -(-k_steps // config.split_k) * config.block_k  # columns per split, whole steps
    splits = -(-k // k_split)
    config = replace(config, split_k=splits)
    if splits == 1:
        out = torch.empty((1, m, n), dtype=x.dtype, device=x.device)
        _launch(x2, packed, code, stats, bias, out, n=n, k=k, k_split=k_split, block_size=block_size,
                config=config)
        return out.view(*x.shape[:-1], n)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _launch(x2, packed, code, stats, None, partial, n=n, k=k, k_split=k_split, block_size=block_size,
            config=config)
    y = partial.sum(0)
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*x.shape[:-1], n)
