"""A one-row NF4 GEMV (also ``M <= 4``), the ``"gemv2"`` kernel of :func:`splice.kernels.nf4_gemv.nf4_linear`.

Math and shapes (as :mod:`splice.kernels.nf4_gemv`): ``x`` ``(M, K)`` bf16 / fp16 / fp32, ``W`` ``(N, K)`` NF4
in bitsandbytes' layout (``w[j] = NF4[c[j]] * absmax[j // block_size]``, two codes a byte, the even one in
the high nibble, the absmax fp32 or double-quantized), ``out`` ``(splits, M, N)``::

    out[s, m, n] = sum_{k in split s} x[m, k] * NF4[c[n * K + k]] * absmax[(n * K + k) // block_size]

fp32 products and sums (the levels and x's values exact), the absmax applied once per block and row;
``block_size`` is 32 or 64 (a block is 4 or 8 int32 words of codes), ``K`` a multiple of it.

Why another kernel: the ``gemv`` kernel streams the codes at a quarter of the memory bandwidth because of
its work per weight, not its bytes. Its x tile (shared by every weight row) is laid out unlike the codes,
so every K step moves x through shared memory with 10 barriers; per weight a thread spends ~6.1 sm_90
instructions in the loop, 1.8 of them on the shared-memory / shuffle / load pipe. Here:

* a thread owns whole blocks: ``BLOCK_N`` rows x ``WPB`` consecutive words (two 16-byte loads a row for
  64-value blocks), the lanes and warps of the program side by side along K (one block a lane), so one
  8-bit absmax lookup serves 64 weights and no two lanes share a block;
* x is loaded in the codes' own layout (the block dimension first, the words in registers), so
  broadcasting it over the rows renames registers: no shared memory and no barrier in the loop. bf16
  x is read as int32 pairs, each half shifted into an fp32's high bits (exact, no conversion), once per
  ``BLOCK_N`` rows; ``BLOCK_M`` (<= 4) rows of x share each decoded level;
* a level is one ``shfl.idx`` from the lane that holds it (``lut="shfl"``, inline PTX; the word only
  shifted) and one fp32 FMA, the 64 of a block chained into one sum, times the absmax once;
* several K steps (K = 14,336): with ``prefetch`` (``num_stages=2``, the default) the next step's codes, absmax
  codes (and x, for one row of x) are loaded before this step's arithmetic in the source, but ptxas moves those
  loads after it (sm_90 SASS), so the codes arrive while other programs compute; the registers they hold double
  the kernel's (190 against 95 for down's default tiles: 12.5% occupancy, H100 ncu, 2026-12-07). Without, a step
  loads, then computes. Where K is one step (4,096), a program loads, waits, then
  computes, nearly in step with its wave. Handing the loads to Triton's pipeliner (cp.async into shared
  memory, 2-3 stages) ran 2-4x slower on an H200 at every Llama-3-8B shape (2026-12-07,
  ``benchmarks/results/h200-2026-12-07-s18/n17``) and was removed. So were row tiles a program, one after
  the other, with the next tile's codes asked of L2 (``prefetch.global.L2``) before this tile's loads: on an
  H100 the whole model at batch 1 ran at 1.47x / 1.33x bf16 with 2 / 4 tiles against 1.61x without
  (2026-12-07, ``benchmarks/results/h100-2026-12-07-s19/n18g18``).

sm_90 SASS (ptxas of Triton 3.6, compiled offline), instructions a weight in the loop, M = 1:
``BLOCK_N`` 8 / 4 / 2: 3.5 / 3.7 / 4.2-4.5, of which 1.1 are shuffles and loads (the shuffle pipe,
32 lanes a clock an SM, is the limit: ~29 weights a clock an SM; HBM at 3.35 TB/s brings 26-29);
M = 4: 1.8-2.5 a weight and row of x. The lanes of a step's ``KB = block_k / block_size`` blocks want
``KB >= 32 * num_warps`` (else lanes repeat work; more puts several blocks on a lane). Triton's
interpreter runs the plain lookups (a ``tl.load`` of the 16-entry table).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from splice.kernels import HAS_TRITON

__all__ = ["gemv2_supports", "launch_gemv2", "levels"]

_SHIFTS = tuple(8 * (j // 2) + (4 if j % 2 == 0 else 0) for j in range(8))  # code j of a word: its bits


def _lookup_asm(mode: int) -> str:
    """PTX for :func:`levels`: one int32 word of packed codes (``$8``: bytes 4t..4t+3 of the row,
    byte 0 in bits 0-7) and the address of the 16-entry fp32 table (``$9``) -> the word's 8 levels
    ``$0..$7`` in column order (byte b's high nibble, then its low one).

    ``mode`` 1 (``ldg``; the table 256-byte aligned): the nibbles are scaled to byte offsets a word at
    a time (4 ops for 8 codes), one ``prmt`` a code writes the offset into the low byte of the
    table's address, one load from L1 (3 instructions a code, with the copy of the address's high
    word). ``mode`` 2 (``shfl``): lane ``l`` holds level ``l % 16`` (one load, the same in every call:
    ptxas merges them into one a loop step) and a code is one ``shfl.idx`` from the lane it names (the
    shuffle reads the lane's low 5 bits, so the word only needs shifting, not masking: 2 a code)."""
    if mode == 1:
        head = [".reg .b32 lo4, hi4, o, bl, bh;", ".reg .b64 p;", "mov.b64 {bl, bh}, $9;",
                "shr.b32 hi4, $8, 2;", "and.b32 hi4, hi4, 0x3C3C3C3C;",
                "shl.b32 lo4, $8, 2;", "and.b32 lo4, lo4, 0x3C3C3C3C;"]
        body = [f"prmt.b32 o, {'hi4' if j % 2 == 0 else 'lo4'}, bl, {0x7650 + j // 2:#x};"
                f" mov.b64 p, {{o, bh}}; ld.global.nc.f32 ${j}, [p];" for j in range(8)]
    else:
        head = [".reg .b32 l, t, s;", ".reg .b64 p;", "mov.u32 l, %laneid;", "and.b32 l, l, 15;",
                "mad.wide.u32 p, l, 4, $9;", "ld.global.nc.f32 t, [p];"]
        body = [(f"shr.b32 s, $8, {sh}; shfl.sync.idx.b32 ${j}, t, s, 0x1f, -1;" if sh else
                 f"shfl.sync.idx.b32 ${j}, t, $8, 0x1f, -1;") for j, sh in enumerate(_SHIFTS)]
    return "{\n" + "\n".join(head + body) + "\n}"


if HAS_TRITON:
    import triton
    import triton.language as tl

    _LDG_ASM = tl.constexpr(_lookup_asm(1))
    _SHFL_ASM = tl.constexpr(_lookup_asm(2))

    @triton.jit
    def levels(words, code_ptr, LUT: tl.constexpr):
        # int32 words -> the fp32 NF4 levels of their 8 codes, 8 tensors shaped as ``words``, in
        # column order (byte 0's high nibble, its low nibble, byte 1's ...). LUT: 0 plain loads, 1 / 2
        # the inline PTX of _lookup_asm
        if LUT == 1:
            return tl.inline_asm_elementwise(_LDG_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,l",
                                             [words, code_ptr.to(tl.int64)], dtype=(tl.float32,) * 8,
                                             is_pure=True, pack=1)
        if LUT == 2:
            return tl.inline_asm_elementwise(_SHFL_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,l",
                                             [words, code_ptr.to(tl.int64)], dtype=(tl.float32,) * 8,
                                             is_pure=True, pack=1)
        return (tl.load(code_ptr + ((words >> 4) & 0xF)), tl.load(code_ptr + (words & 0xF)),
                tl.load(code_ptr + ((words >> 12) & 0xF)), tl.load(code_ptr + ((words >> 8) & 0xF)),
                tl.load(code_ptr + ((words >> 20) & 0xF)), tl.load(code_ptr + ((words >> 16) & 0xF)),
                tl.load(code_ptr + ((words >> 28) & 0xF)), tl.load(code_ptr + ((words >> 24) & 0xF)))

    @triton.jit
    def _split4(t):
        # (..., 4) -> its 4 slices along the last (in-register) dimension, in order
        a, b = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2)))
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return a0, b0, a1, b1

    @triton.jit
    def _words(words, WPB: tl.constexpr):
        # (KB, BLOCK_N, WPB // 4, 4) -> a tuple of the WPB words of each block, each (KB, BLOCK_N)
        a, b, c, d = _split4(words)
        if WPB == 4:  # (both branches return: Triton compiles what follows an early return too)
            return (tl.reshape(a, a.shape[:2]), tl.reshape(b, b.shape[:2]), tl.reshape(c, c.shape[:2]),
                    tl.reshape(d, d.shape[:2]))
        else:
            a0, a1 = tl.split(a)
            b0, b1 = tl.split(b)
            c0, c1 = tl.split(c)
            d0, d1 = tl.split(d)
            return a0, b0, c0, d0, a1, b1, c1, d1

    @triton.jit
    def _x_words(x_row, pair, live, WPB: tl.constexpr, XK: tl.constexpr):
        # one row of x's columns of the step's blocks in fp32: a tuple over the WPB words of a block of
        # tuples of the word's 8 columns, each (KB, 1), 0 where not live. pair: (KB, 1, WPB, 4) the column
        # pairs (2p, 2p + 1). XK: 1 bf16 (the pairs read as int32, each half shifted into an fp32's high
        # bits: no conversion), 0 any float dtype (loaded, converted)
        if XK == 1:
            bits = tl.load(x_row.to(tl.pointer_type(tl.int32)) + pair, mask=live, other=0)
            lo = (bits << 16).to(tl.float32, bitcast=True)
            hi = (bits & -65536).to(tl.float32, bitcast=True)
        else:
            cols = 2 * pair[:, :, :, :, None] + tl.arange(0, 2)[None, None, None, None, :]
            x = tl.load(x_row + cols, mask=live[:, :, :, :, None], other=0.0)
            lo, hi = tl.split(x.to(tl.float32))
        shape: tl.constexpr = (pair.shape[0], 1, WPB // 4, 4)
        l0, l1, l2, l3 = _split4(lo)  # (KB, 1, WPB): column 2i of every word of the block
        h0, h1, h2, h3 = _split4(hi)
        lw0, lw1 = _words(tl.reshape(l0, shape), WPB), _words(tl.reshape(l1, shape), WPB)
        lw2, lw3 = _words(tl.reshape(l2, shape), WPB), _words(tl.reshape(l3, shape), WPB)
        hw0, hw1 = _words(tl.reshape(h0, shape), WPB), _words(tl.reshape(h1, shape), WPB)
        hw2, hw3 = _words(tl.reshape(h2, shape), WPB), _words(tl.reshape(h3, shape), WPB)
        out = ()
        for w in tl.static_range(WPB):
            columns = (lw0[w], hw0[w], lw1[w], hw1[w], lw2[w], hw2[w], lw3[w], hw3[w])
            out = out + (columns,)  # type: ignore[assignment]
        return out

    @triton.jit
    def _load_step(x_ptr, words_ptr, absmax_ptr, qabsmax_ptr, b0, lane_b, b_end, k_blocks, word, row_block, pair,
                   m0, M, stride_xm, BLOCK_M: tl.constexpr, WPB: tl.constexpr, DOUBLE: tl.constexpr,
                   XK: tl.constexpr, MASKED: tl.constexpr, LOAD_X: tl.constexpr):
        # the loads of the step from block b0: the words (KB, BLOCK_N, WPB // 4, 4), the blocks' stored
        # statistic (KB, BLOCK_N) (the 8-bit code of the absmax, decoded once it has arrived, or the fp32
        # absmax), the blocks' indices and, if LOAD_X, BLOCK_M rows of x's columns (_x_words; else ()).
        # Blocks past the split read 0 x; MASKED: their codes are not read either (a prefetch past the
        # end), else they are read clamped (no mask)
        kb = tl.minimum(b0 + lane_b, k_blocks - 1)
        live = b0 + lane_b < b_end
        block = row_block + kb[:, None]
        words_at = words_ptr + (word + (WPB * (kb - lane_b))[:, None, None, None])
        stat_at = qabsmax_ptr + block if DOUBLE else absmax_ptr + block
        if MASKED:
            words = tl.load(words_at, mask=live[:, None, None, None], other=0, eviction_policy="evict_first")
            stat = tl.load(stat_at, mask=live[:, None], other=0, eviction_policy="evict_first")
        else:
            words = tl.load(words_at, eviction_policy="evict_first")
            stat = tl.load(stat_at, eviction_policy="evict_first")
        xs = ()
        for i in tl.static_range(BLOCK_M if LOAD_X else 0):
            m = m0 + i
            row = _x_words(x_ptr + m.to(tl.int64) * stride_xm, pair + WPB * 4 * b0,
                           live[:, None, None, None] & (m < M), WPB, XK)
            xs = xs + (row,)  # type: ignore[assignment]
        return words, stat, block, xs

    @triton.jit
    def _tile_at(tile, N, END0, END1, D_WORDS1, D_WORDS2, D_STAT1, D_STAT2, D_SCALE1, D_SCALE2, D_OFFSET1,
                 D_OFFSET2, D_LUT1, D_LUT2, D_CODE2_1, D_CODE2_2, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
        # row tile ``tile``: its rows (BLOCK_N,), which are live, the rows within their own weight (clamped: the
        # loads need no row mask) and its weight's element deltas from the first weight's tensors (words, stat,
        # scale2, offset, level table, code2; 0 unless GROUPED: the kernel's comment)
        first = tile * BLOCK_N
        rows = first + tl.arange(0, BLOCK_N)
        if GROUPED:
            second, third = first >= END0, first >= END1
            start = tl.where(third, END1, tl.where(second, END0, 0))
            stop = tl.where(third, N, tl.where(second, END1, END0))
            deltas = (tl.where(third, D_WORDS2, tl.where(second, D_WORDS1, 0)),
                      tl.where(third, D_STAT2, tl.where(second, D_STAT1, 0)),
                      tl.where(third, D_SCALE2, tl.where(second, D_SCALE1, 0)),
                      tl.where(third, D_OFFSET2, tl.where(second, D_OFFSET1, 0)),
                      tl.where(third, D_LUT2, tl.where(second, D_LUT1, 0)),
                      tl.where(third, D_CODE2_2, tl.where(second, D_CODE2_1, 0)))
            # (clamped at 0 too: a last program's tiles past N, where no third weight exists, have stop == start)
            return rows, rows < stop, tl.maximum(tl.minimum(rows - start, stop - start - 1), 0), deltas
        else:
            zero = tile * 0
            return rows, rows < N, tl.minimum(rows, N - 1), (zero, zero, zero, zero, zero, zero)

    @triton.jit
    def _codes_at(rows_c, lane_b, K_WORDS, k_blocks, WPB: tl.constexpr):
        # the word offsets (KB, BLOCK_N, WPB // 4, 4) of lane b's block in each row at a step's first block, and
        # the rows' first block indices (1, BLOCK_N)
        word = (rows_c[None, :, None, None] * K_WORDS + WPB * lane_b[:, None, None, None]
                + 4 * tl.arange(0, WPB // 4)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :])
        return word, rows_c[None, :] * k_blocks

    @triton.jit
    def _step_sums(words, stat, block, xs, code_ptr, code2_ptr, scale2_ptr, offset_ptr, BLOCK_M: tl.constexpr,
                   WPB: tl.constexpr, DOUBLE: tl.constexpr, LUT: tl.constexpr):
        # a step's products, per row of x: (KB, BLOCK_N) sums over each block of level x column, times the
        # block's absmax (once per row and block); each level decoded once for every row of x
        if DOUBLE:  # code2[q] * scale2[block // 256] + offset (splice.kernels.nf4's formula)
            scale2 = tl.load(scale2_ptr + (block >> 8))
            absmax = tl.load(code2_ptr + stat.to(tl.int32)) * scale2 + tl.load(offset_ptr)
        else:
            absmax = stat
        ws = _words(words, WPB)
        dots = ()
        for _i in tl.static_range(BLOCK_M):
            dots = dots + (tl.zeros(stat.shape, dtype=tl.float32),)  # type: ignore[assignment]
        for w in tl.static_range(WPB):
            v0, v1, v2, v3, v4, v5, v6, v7 = levels(ws[w], code_ptr, LUT)
            new = ()
            for i in tl.static_range(BLOCK_M):
                x0, x1, x2, x3, x4, x5, x6, x7 = xs[i][w]
                d = dots[i] + v0 * x0
                d += v1 * x1
                d += v2 * x2
                d += v3 * x3
                d += v4 * x4
                d += v5 * x5
                d += v6 * x6
                d += v7 * x7
                new = new + (d,)  # type: ignore[assignment]
            dots = new
        out = ()
        for i in tl.static_range(BLOCK_M):
            out = out + (dots[i] * absmax,)  # type: ignore[assignment]
        return out

    @triton.jit
    def _store_rows(sums, out_ptr, bias_ptr, rows, row_live, split, stride_os, m0, M, N, BLOCK_M: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
        # out[split, m0 + i, rows] = the sum over the tile's blocks of sums[i] (+ bias)
        for i in tl.static_range(BLOCK_M):
            m = m0 + i
            y = tl.sum(sums[i], axis=0)  # (BLOCK_N,)
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows, mask=row_live, other=0.0).to(tl.float32)
            tl.store(out_ptr + split * stride_os + m * N + rows, y.to(out_ptr.dtype.element_ty),
                     mask=row_live & (m < M))

    @triton.jit
    def _nf4_gemv2_kernel(x_ptr, words_ptr, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code_ptr,
                          code2_ptr, bias_ptr, out_ptr, M, N, K_WORDS, B_SPLIT, stride_xm, stride_os,
                          END0, END1, D_WORDS1, D_WORDS2, D_STAT1, D_STAT2, D_SCALE1, D_SCALE2, D_OFFSET1,
                          D_OFFSET2, D_LUT1, D_LUT2, D_CODE2_1, D_CODE2_2,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KB: tl.constexpr, WPB: tl.constexpr,
                          DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, LUT: tl.constexpr, XK: tl.constexpr,
                          PREFETCH: tl.constexpr, GROUPED: tl.constexpr):
        # program (row tile, BLOCK_M rows of x, K split): out[split, ms, rows] over the split's blocks, KB blocks
        # a step, a thread whole blocks (WPB words) of BLOCK_N rows. PREFETCH (several steps a split): the next
        # step's loads written before this step's arithmetic (ptxas moves them after it: sm_90 SASS), x's too for
        # one row of x. GROUPED: the rows are up to three weights' back to back (rows END0 and END1 start the
        # second and third; a tile lies within one): a tile's weight is the first's pointers moved by its D_*
        # (element deltas to the second's / third's tensors)
        split = tl.program_id(2)
        m0 = tl.program_id(1) * BLOCK_M
        k_blocks = K_WORDS // WPB
        b_first = split * B_SPLIT
        b_end = tl.minimum(b_first + B_SPLIT, k_blocks)
        lane_b = tl.arange(0, KB)
        pair = (WPB * 4 * lane_b[:, None, None, None] + 4 * tl.arange(0, WPB)[None, None, :, None]
                + tl.arange(0, 4)[None, None, None, :])  # (KB, 1, WPB, 4)
        rows, row_live, rows_c, d = _tile_at(tl.program_id(0), N, END0, END1, D_WORDS1, D_WORDS2, D_STAT1, D_STAT2,
                                             D_SCALE1, D_SCALE2, D_OFFSET1, D_OFFSET2, D_LUT1, D_LUT2, D_CODE2_1,
                                             D_CODE2_2, BLOCK_N, GROUPED)
        word, row_block = _codes_at(rows_c, lane_b, K_WORDS, k_blocks, WPB)
        if not PREFETCH:  # one step at a time: plain loads, clamped past the split (no mask)
            accs = ()
            for _i in tl.static_range(BLOCK_M):
                accs = accs + (tl.zeros((KB, BLOCK_N), dtype=tl.float32),)  # type: ignore[assignment]
            for b0 in range(b_first, b_end, KB):
                words, stat, block, xs = _load_step(x_ptr, words_ptr + d[0], absmax_ptr + d[1], qabsmax_ptr + d[1],
                                                    b0, lane_b, b_end, k_blocks, word, row_block, pair, m0, M,
                                                    stride_xm, BLOCK_M, WPB, DOUBLE, XK, False, True)
                sums = _step_sums(words, stat, block, xs, code_ptr + d[4], code2_ptr + d[5], scale2_ptr + d[2],
                                  offset_ptr + d[3], BLOCK_M, WPB, DOUBLE, LUT)
                new = ()
                for i in tl.static_range(BLOCK_M):
                    new = new + (accs[i] + sums[i],)  # type: ignore[assignment]
                accs = new
            _store_rows(accs, out_ptr, bias_ptr, rows, row_live, split, stride_os, m0, M, N, BLOCK_M, HAS_BIAS)
        else:  # PREFETCH by hand: several steps a split
            words_ptr += d[0]
            absmax_ptr += d[1]
            qabsmax_ptr += d[1]
            scale2_ptr += d[2]
            offset_ptr += d[3]
            code_ptr += d[4]
            code2_ptr += d[5]
            accs = ()
            for _i in tl.static_range(BLOCK_M):
                accs = accs + (tl.zeros((KB, BLOCK_N), dtype=tl.float32),)  # type: ignore[assignment]
            X_AHEAD: tl.constexpr = BLOCK_M == 1
            words, stat, block, xs = _load_step(x_ptr, words_ptr, absmax_ptr, qabsmax_ptr, b_first, lane_b, b_end,
                                                k_blocks, word, row_block, pair, m0, M, stride_xm, BLOCK_M, WPB,
                                                DOUBLE, XK, True, X_AHEAD)
            for b0 in range(b_first, b_end, KB):
                words_n, stat_n, block_n, xs_n = _load_step(x_ptr, words_ptr, absmax_ptr, qabsmax_ptr, b0 + KB,
                                                            lane_b, b_end, k_blocks, word, row_block, pair, m0, M,
                                                            stride_xm, BLOCK_M, WPB, DOUBLE, XK, True, X_AHEAD)
                if not X_AHEAD:  # (its codes' loads unused: dropped by the compiler)
                    _, _, _, xs = _load_step(x_ptr, words_ptr, absmax_ptr, qabsmax_ptr, b0, lane_b, b_end,
                                             k_blocks, word, row_block, pair, m0, M, stride_xm, BLOCK_M, WPB,
                                             DOUBLE, XK, True, True)
                sums = _step_sums(words, stat, block, xs, code_ptr, code2_ptr, scale2_ptr, offset_ptr, BLOCK_M,
                                  WPB, DOUBLE, LUT)
                new = ()
                for i in tl.static_range(BLOCK_M):
                    new = new + (accs[i] + sums[i],)  # type: ignore[assignment]
                accs = new
                words, stat, block, xs = words_n, stat_n, block_n, xs_n
            _store_rows(accs, out_ptr, bias_ptr, rows, row_live, split, stride_os, m0, M, N, BLOCK_M, HAS_BIAS)


def gemv2_supports(*, n: int, k: int, block_size: int) -> bool:
    """Whether the gemv2 kernel takes an ``(n, k)`` weight: blocks of 32 or 64 values (4 or 8 whole int32
    words of codes) that tile each row, and offsets that fit int32 (fewer than 2^31 words)."""
    return block_size in (32, 64) and k % block_size == 0 and n * (k // 8) < 2**31


def launch_gemv2(x2: Tensor, words: Tensor, code: Tensor, stats: tuple[Tensor, ...], bias: Tensor | None,
                 out: Tensor, *, n: int, k: int, k_split: int, block_size: int, block_n: int, block_k: int,
                 lut: int, num_warps: int, group: Sequence[Sequence[int]] = (), prefetch: bool = True) -> None:
    """One launch writing ``out`` ``(splits, M, N)`` (module doc) for ``x2`` ``(M, K)`` (rows contiguous) and the
    packed codes as int32 ``words``. ``stats``: the (absmax, qabsmax, scale2, offset, code2) pointers, ``code``
    standing in for the unused ones (double quantization when absmax is ``code``); ``k_split`` columns a K
    split (a multiple of ``block_k``); ``block_n`` weight rows and ``block_k`` columns (``block_k /
    block_size`` a power of two) a program step; ``lut``: :func:`levels`' switch, 2 the shuffle or 0 plain loads
    (nf4_gemv's ``_lut``: plain in the interpreter; 1, ``ldg``, is refused before). Up to 4 rows of x share a
    program's decoded levels. ``group``: for a launch over 2-3 sibling weights (``n`` rows in all, the first
    weight's tensors passed), per further weight its first row (a multiple of ``block_n``) and its tensors'
    element offsets from the first's: (row, words, absmax or qabsmax, scale2, offset, code, code2). ``prefetch``:
    where a split has several steps, the next step's loads go out before this step's arithmetic (in registers)."""
    m = x2.shape[0]
    block_m = min(4, 1 << max(0, m - 1).bit_length())
    absmax, qabsmax, scale2, offset, code2 = stats
    # bf16 pairs as int32 need 4-byte aligned rows: torch's allocations and even row strides are
    bf16_pairs = x2.dtype == torch.bfloat16 and x2.data_ptr() % 4 == 0 and x2.stride(0) % 2 == 0
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), out.shape[0])
    padded = [*group, *[(n, 0, 0, 0, 0, 0, 0)] * (2 - len(group))]  # (an absent third weight starts at n)
    second, third = padded
    # END0, END1, then each tensor's deltas for the second and third weights, in the kernel's order
    members = [second[0], third[0]] + [d for pair in zip(second[1:], third[1:], strict=True) for d in pair]
    _nf4_gemv2_kernel[grid](
        x2, words, absmax, qabsmax, scale2, offset, code, code2, code if bias is None else bias, out,
        m, n, k // 8, k_split // block_size, x2.stride(0), out.stride(0), *members,
        BLOCK_N=block_n, BLOCK_M=block_m, KB=block_k // block_size, WPB=block_size // 8,
        DOUBLE=absmax is code, HAS_BIAS=bias is not None, LUT=lut,
        XK=1 if bf16_pairs else 0, PREFETCH=prefetch and k_split > block_k, GROUPED=bool(group),
        num_warps=num_warps, num_stages=1)
