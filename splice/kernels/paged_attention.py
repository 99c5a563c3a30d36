"""Paged attention for the generation engine: decode, chunked prefill and mixed batches in one call.

KV layout (per decoder layer): ``key_cache`` / ``value_cache`` are ``(NB, BS, Hkv, D)``; the token
at position ``p`` of sequence ``b`` lives in block ``block_tables[b, p // BS]`` at row ``p % BS``
(flat slot ``block * BS + p % BS``, written by :func:`~splice.kernels.kv_cache.write_kv`).

Queries are flat: ``q`` is ``(T, Hq, D)`` holding the queries of ``B`` sequences back to back;
sequence ``b`` owns rows ``qsl[b] : qsl[b + 1]`` (``qsl = query_start_loc``, ``L_b`` rows) at
positions ``n_b - L_b .. n_b - 1`` where ``n_b = seq_lens[b]`` counts the tokens in the cache,
this step's included. A decode is ``L_b = 1``, a prefill chunk ``L_b > 1``. For the query of head
``h`` at position ``p`` (GQA: ``G = Hq // Hkv``, kv head ``h // G``)::

    s_k = scale * q . K[k]                         for keys k <= p (and k > p - window if window > 0)
    s_k = softcap * tanh(s_k / softcap)            if softcap > 0
    out = sum_k softmax(s)_k V[k]                  softmax in fp32, out in q's dtype

The Triton path (CUDA tensors) is flash-decoding over pages: one program per (query tile, kv
head, partition of the context) loads each K/V tile once and serves every query head of its kv
head (a tile is ``BLOCK_Q`` query tokens x ``G`` heads, so ``tl.dot`` runs on >= 16 rows even for a
decode), with an online softmax in fp32. When too few tiles exist to fill the GPU (small-batch
decode at long context) the context is split into partitions whose partial results (running max,
sum, unnormalized output) a second small kernel merges. Programs find their sequence by a binary search over
``qsl`` on the device (in a decode call tile ``b`` is sequence ``b``); the grid depends only on host ints (``T``,
``B``, ``max_query_len``, ``max_seq_len``) and programs past a sequence's length exit at once, so the call never
syncs with the host and a CUDA graph can capture it with upper bounds. Any head_dim works (padded to a power of
two >= 16 under masks: 80 and 96 too); fp16 / bf16 / fp32 (fp32: IEEE dots).
int8 caches (:mod:`splice.kernels.kv_cache`: a scale per token and kv head, values token-major) run the
dots in q's dtype on the codes: the keys' scales multiply the scores, the values' the probabilities.

H200, Llama-3-8B heads (bf16, block 16; benchmarks/paged_attention.py, CUDA graphs): decode 128 x 4,096 503 us
= 4.27 TB/s (SDPA over dense tensors: 468), 32 x 1,024 43 us (SDPA 35); 2,048-token prefill 190 TFLOP/s (SDPA 417).

:func:`paged_attention_reference` (:mod:`splice.kernels.paged_reference`) is plain PyTorch, one sequence at a time;
it is also the CPU path, except for decode steps (one query a sequence), which take one batched attention.

``skip_fresh``: the caller has computed the fresh sequences itself (no cached prefix: ``n_b == L_b``;
:mod:`splice.kernels.varlen_attention` over the step's own K/V) into ``out``; their rows are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from splice.kernels import use_triton
from splice.kernels.paged_reference import check_layout, decode_reference, paged_attention_reference

try:  # Triton only ships with CUDA builds of torch; the CPU path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["KernelConfig", "default_config", "paged_attention", "paged_attention_reference", "paged_attention_triton"]


def paged_attention(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, *, block_tables: Tensor, seq_lens: Tensor,
    query_start_loc: Tensor, scale: float, max_query_len: int, max_seq_len: int, window: int = 0,
    softcap: float = 0.0, out: Tensor | None = None, key_scale: Tensor | None = None,
    value_scale: Tensor | None = None, skip_fresh: bool = False,
) -> Tensor:
    """Paged attention (module doc): the Triton kernels for CUDA tensors, the reference elsewhere.

    ``max_query_len`` / ``max_seq_len`` are host upper bounds on ``L_b`` / ``n_b`` that size the grid (any upper
    bound is correct). Returns ``(T, Hq, D)`` in q's dtype (``out`` when given). int8 caches take their fp32
    ``key_scale`` / ``value_scale`` (NB, BS, Hkv) (module doc). ``skip_fresh`` (module doc) needs ``out``."""
    if skip_fresh and (out is None or out.stride(-1) != 1):
        raise ValueError("paged_attention: skip_fresh leaves the fresh sequences' rows of out as they are; give "
                         "out (T, Hq, D) with a contiguous last dim, holding them")
    kernels = triton is not None and use_triton(q, key_cache)
    extra: dict[str, Any] = {"key_scale": key_scale, "value_scale": value_scale, "skip_fresh": skip_fresh}
    if not kernels and max_query_len <= 1 and q.shape[0] == seq_lens.shape[0] and q.shape[0] > 1 \
            and not skip_fresh:
        check_layout(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, key_scale, value_scale)
        return decode_reference(q, key_cache, value_cache, block_tables=block_tables, seq_lens=seq_lens,
                                scale=scale, window=window, softcap=softcap, out=out, key_scale=key_scale,
                                value_scale=value_scale)  # (one query a sequence)
    fn = paged_attention_triton if kernels else paged_attention_reference
    return fn(q, key_cache, value_cache, block_tables=block_tables, seq_lens=seq_lens,
              query_start_loc=query_start_loc, scale=scale, max_query_len=max_query_len,
              max_seq_len=max_seq_len, window=window, softcap=softcap, out=out, **extra)


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Tile sizes of the Triton path. A tile is ``block_q`` query tokens x the group's heads
    (padded to >= 16 rows); ``block_n`` keys per inner step; the context is split into partitions
    of >= ``min_partition`` keys only while that brings the programs up to ``programs_per_sm`` per SM.
    ``unmasked_steps``: the steps below the causal edge run in a second loop without masks (prefill
    tiles: +30% on the H200; decode: the second loop's buffers cost occupancy, -10% at batch 128).
    ``direct_decode``: in a decode call (``max_query_len <= 1``) tile ``b`` is sequence ``b``, one query
    token, found without the binary search over ``query_start_loc`` (a chain of dependent loads that
    every program of a short-context decode otherwise waits on first). ``split_decodes``: a call's one-query
    sequences in a launch of their own, decode tiles (a prefill tile's rows past a decode's ``G`` compute nothing).
    ``loop_stages``: the key loops pipelined that deep (cp.async; at 0 not at all, whatever ``num_stages`` says)."""

    block_q: int
    block_n: int
    num_warps: int
    num_stages: int
    min_partition: int = 128
    programs_per_sm: int = 2
    unmasked_steps: bool = False
    direct_decode: bool = True
    split_decodes: bool = True
    loop_stages: int = 0


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_config(*, decode: bool, group: int, head_dim: int, int8: bool = False) -> KernelConfig:
    """Decode: 16-row tiles (memory-bound, one query token per sequence), over int8 caches 64 keys a step on 2
    warps, 2 stages (H100, CUDA graphs, 2026-12-06, ``benchmarks/paged_attention.py --int8 --sweep``, us: B=32 x
    1,024 36.4, B=32 x 4,096 114.4, B=128 x 1,024 115.0, against 41.2, 132.8, 121.1 with 128 keys on 4 warps,
    the default before); prefill: 128-row tiles (64 at head_dim 256), the key loop pipelined 3 deep at head dims up
    to 128 (H200, 2026-12-06, ``--sweep``: a fresh 2,048 prompt 172 against 183 us, 8 x 512 121 against 122).
    Decode's loops stay unpipelined: 0 to 4 stages timed alike."""
    g_pad, wide = _pow2(group), _pow2(head_dim) > 128
    if decode:
        if int8 and not wide:
            return KernelConfig(block_q=max(1, 16 // g_pad), block_n=64, num_warps=2, num_stages=2)
        return KernelConfig(block_q=max(1, 16 // g_pad), block_n=32 if wide else 64, num_warps=4, num_stages=3)
    rows = 64 if wide else 128
    return KernelConfig(block_q=max(1, rows // g_pad), block_n=32 if wide else 64, num_warps=rows // 16,
                        num_stages=2, unmasked_steps=True, loop_stages=0 if wide else 3)


def _partition_len(cfg: KernelConfig, *, tiles: int, max_seq_len: int, device: torch.device) -> int:
    """Keys per partition: the whole context (one pass) unless the tiles are too few to fill the GPU."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    parts = min(-(-cfg.programs_per_sm * sms // tiles), -(-max_seq_len // cfg.min_partition))
    if parts <= 1:
        return 0
    per_part = -(-max_seq_len // parts)
    return -(-per_part // cfg.block_n) * cfg.block_n


def paged_attention_triton(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, *, block_tables: Tensor, seq_lens: Tensor,
    query_start_loc: Tensor, scale: float, max_query_len: int, max_seq_len: int, window: int = 0,
    softcap: float = 0.0, out: Tensor | None = None, config: KernelConfig | None = None,
    key_scale: Tensor | None = None, value_scale: Tensor | None = None, skip_fresh: bool = False,
) -> Tensor:
    """The Triton path of :func:`paged_attention` (``config``: tile sizes, default :func:`default_config`)."""
    check_layout(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, key_scale, value_scale)
    quant = key_scale is not None  # int8 codes: dots in q's dtype, the scales applied around them
    tokens, hq, d = q.shape
    hkv, block_size = key_cache.shape[2], key_cache.shape[1]
    group, seqs = hq // hkv, seq_lens.shape[0]
    cfg = config or default_config(decode=max_query_len <= 1, group=group, head_dim=d, int8=quant)
    direct = cfg.direct_decode and max_query_len <= 1  # tile b = sequence b (KernelConfig)
    split = cfg.split_decodes and max_query_len > 1  # the one-query sequences in a launch of their own
    block_q = 1 if direct else cfg.block_q
    q = q if q.stride(-1) == 1 else q.contiguous()
    if quant and value_cache.stride(1) != 1:
        raise ValueError("paged_attention: an int8 value cache is token-major: make it with kv_cache.kv_caches")
    key_cache, value_cache = (c if c.stride(-1) == 1 or quant else c.contiguous() for c in (key_cache, value_cache))
    fits = out is not None and out.stride(-1) == 1
    result = out if out is not None and fits else torch.empty_like(q, memory_format=torch.contiguous_format)
    # the grid's tile count bounds sum_b ceil(L_b / block_q) (module doc: binary search on the device)
    tiles = seqs if direct else tokens // block_q + seqs
    busy = max(seqs, -(-tokens // block_q)) * hkv  # tiles with work, estimated from host ints
    part_len = _partition_len(cfg, tiles=busy, max_seq_len=max_seq_len, device=q.device)
    parts = -(-max_seq_len // part_len) if part_len else 1
    g_pad, d_pad = _pow2(group), max(16, _pow2(d))
    # split-KV partials: unnormalized outputs (T, Hq, P, D_PAD) and (max, sum) as (2, T, Hq, P), fp32
    partial = (torch.empty(tokens, hq, parts, d_pad, device=q.device, dtype=torch.float32),
               torch.empty(2, tokens, hq, parts, device=q.device, dtype=torch.float32)) if parts > 1 else None
    # scores in base 2 (exp2): scale * log2(e) folded in, or applied after the softcap's tanh
    qk_scale, cap = (scale, softcap * _LOG2E) if softcap > 0 else (scale * _LOG2E, 1.0)

    def launch(cfg: KernelConfig, grid: tuple[int, int, int], block_q: int, *, direct: bool, only: int,
               partial: tuple[Tensor, Tensor] | None, part_len: int, parts: int) -> None:
        # only: 0 every sequence, 1 the one-query ones, 2 the others (split_decodes)
        _attention_kernel[grid](
            q, key_cache, value_cache, key_scale if quant else q, value_scale if quant else q, result,
            *(partial or (result, result)), block_tables, seq_lens,
            query_start_loc, seqs, tokens * hq * parts, qk_scale, cap, window, part_len or (1 << 30), parts,
            q.stride(0), q.stride(1), result.stride(0), result.stride(1), *key_cache.stride()[:3],
            *value_cache.stride(), block_tables.stride(0), GROUP=group, G_PAD=g_pad, BLOCK_Q=block_q,
            ROWS=max(16, block_q * g_pad), BLOCK_N=cfg.block_n, BS=block_size, D=d, D_PAD=d_pad,
            SPLIT=partial is not None, SOFTCAP=softcap > 0, WINDOW=window > 0,
            IEEE=(q if quant else key_cache).dtype == torch.float32, UNMASKED=cfg.unmasked_steps and window == 0,
            DIRECT=direct, QUANT=quant, ONLY=only, V_RUN=min(block_size, cfg.block_n), LOOP_STAGES=cfg.loop_stages,
            SKIP_FRESH=skip_fresh, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if split:  # the decodes, one pass over its context each (no partitions; the reduce skips them)
        launch(default_config(decode=True, group=group, head_dim=d, int8=quant), (seqs, hkv, 1), 1, direct=True, only=1,
               partial=None, part_len=0, parts=1)
    launch(cfg, (tiles, hkv, parts), block_q, direct=direct, only=2 if split else 0, partial=partial,
           part_len=part_len, parts=parts)
    if partial is not None:
        _reduce_kernel[(tokens, hq)](
            result, *partial, seq_lens, query_start_loc, seqs, tokens * hq * parts, window, part_len, parts,
            result.stride(0), result.stride(1), P_PAD=_pow2(parts), D=d, D_PAD=d_pad, WINDOW=window > 0,
            SKIP_SINGLE=split, SKIP_FRESH=skip_fresh, num_warps=4)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


_LOG2E = 1.4426950408889634

if triton is not None:
    from splice.kernels.kv_cache import int8_tiles

    @triton.jit
    def _find_sequence(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr, TILES: tl.constexpr):
        # the b with start_b <= target < start_{b+1}; TILES: start_b = qsl[b] // BLOCK_Q + b (tile index)
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            start = tl.load(qsl_ptr + mid)
            if TILES:
                start = start // BLOCK_Q + mid
            if start <= target:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # fp32 caches: no TF32 rounding
            return tl.dot(a, b, out_dtype=tl.float32, input_precision="ieee")
        return tl.dot(a, b, out_dtype=tl.float32)

    @triton.jit
    def _keys_step(acc, m_i, l_i, q, start, key_end, pos, table, k_at, v_at, ks_at, vs_at, dd, d_ok, window,
                   qk_scale, cap, stride_kb, stride_kt, stride_vb, stride_vt, stride_vd, stride_sb, stride_st,
                   BLOCK_N: tl.constexpr, BS: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                   IEEE: tl.constexpr, MASK: tl.constexpr, QUANT: tl.constexpr, V_RUN: tl.constexpr):
        # one BLOCK_N-key step of the online softmax (base 2); MASK: apply causal / window / length masks
        kpos = tl.multiple_of(start, BLOCK_N) + tl.arange(0, BLOCK_N)  # (every step starts on a BLOCK_N edge)
        k_ok = kpos < key_end
        block = tl.load(table + kpos // BS, mask=k_ok, other=0).to(tl.int64)
        if QUANT:  # int8 codes (exact in q's dtype); the keys' scales after the dot, the values' on p
            k, v, k_scale, v_scale = int8_tiles(k_at, v_at, ks_at, vs_at, table, start, kpos, k_ok, block, key_end,
                                                dd, d_ok, stride_kb, stride_kt, stride_vb, stride_vt, stride_vd,
                                                stride_sb, stride_st, BLOCK_N, BS, V_RUN)
            s = _dot(q, tl.trans(k.to(q.dtype)), IEEE) * (k_scale * qk_scale)[None, :]
            v = tl.trans(v.to(q.dtype))
        else:
            k = tl.load(k_at + block[None, :] * stride_kb + (kpos % BS)[None, :] * stride_kt + dd[:, None],
                        mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # (D_PAD, BLOCK_N)
            v = tl.load(v_at + block[:, None] * stride_vb + (kpos % BS)[:, None] * stride_vt + dd[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, D_PAD)
            v_scale = k_ok  # (unused)
            s = _dot(q, k, IEEE) * qk_scale
        if SOFTCAP:
            s = cap * _tanh_cap(s, cap)
        if MASK:
            allowed = k_ok[None, :] & (kpos[None, :] <= pos[:, None])
            if WINDOW:
                allowed = allowed & (kpos[None, :] > pos[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
        return _online_softmax(acc, m_i, l_i, s, v, v_scale, IEEE, MASK, QUANT)

    @triton.jit
    def _tanh_cap(s, cap):
        # tanh(s / softcap) for natural scores s and cap = softcap log2(e) (cap * this: the capped base-2 score);
        # tanh x = 1 - 2 / (e^2x + 1), which saturates cleanly at +-1
        two_x_log2e = s * (2.0 * 1.4426950408889634 * 1.4426950408889634 / cap)  # 2 x log2(e)
        return 1.0 - 2.0 / (tl.exp2(two_x_log2e) + 1.0)

    @triton.jit
    def _online_softmax(acc, m_i, l_i, s, v, v_scale, IEEE: tl.constexpr, MASK: tl.constexpr, QUANT: tl.constexpr):
        # fold base-2 scores s (rows, keys) and values v (keys, D) into the running (acc, max, sum); QUANT: v
        # holds int8 codes whose scales v_scale (keys,) multiply p's columns
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if MASK:  # rows with no visible key yet keep all weights 0
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.exp2(s - m_new_safe[:, None])
        alpha = tl.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if QUANT:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return acc, m_new, l_i

    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, part_out_ptr, part_ml_ptr, tables_ptr, seq_lens_ptr, qsl_ptr,
        num_seqs, ml_half, qk_scale, cap, window, part_len, parts,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
        stride_vh, stride_vd, stride_bt, GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
        UNMASKED: tl.constexpr, DIRECT: tl.constexpr, QUANT: tl.constexpr, ONLY: tl.constexpr, V_RUN: tl.constexpr,
        LOOP_STAGES: tl.constexpr, SKIP_FRESH: tl.constexpr,
    ):
        # program (tile, kv head h, partition): rows r = (query m = r // G_PAD, head h * GROUP + r % G_PAD)
        tile, h, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if DIRECT:  # a decode call: tile b is sequence b, its one query (or none) at qsl[b]
            b = tile
            q_start = tl.load(qsl_ptr + b)
            q_len = tl.load(qsl_ptr + b + 1) - q_start
            first_q = 0
        else:
            b = _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q, True)
            q_start = tl.load(qsl_ptr + b)
            q_len = tl.load(qsl_ptr + b + 1) - q_start
            first_q = (tile - q_start // BLOCK_Q - b) * BLOCK_Q  # the tile's first query within the sequence
        skip = first_q >= q_len
        if ONLY > 0:  # 1: this launch serves the one-query sequences (split_decodes), 2: the others
            skip = skip | ((q_len == 1) != (ONLY == 1))
        seq_len = tl.load(seq_lens_ptr + b)
        if SKIP_FRESH:  # a fresh sequence (no cached prefix): the caller's (module doc)
            skip = skip | (seq_len == q_len)
        if skip:
            return
        first_pos = seq_len - q_len  # position of the sequence's first query
        r = tl.arange(0, ROWS)
        m = first_q + r // G_PAD
        head = h * GROUP + r % G_PAD
        row_ok = (r // G_PAD < BLOCK_Q) & (r % G_PAD < GROUP) & (m < q_len)
        pos = first_pos + m
        key_end = tl.minimum(first_pos + tl.minimum(first_q + BLOCK_Q, q_len), (part + 1) * part_len)
        key_begin = part * part_len
        if WINDOW:
            key_begin = tl.maximum(key_begin, (first_pos + first_q - window + 1) // BLOCK_N * BLOCK_N)
        if key_begin >= key_end:
            return  # no row of this tile sees this partition (the reduce skips it too)
        # UNMASKED: keys below full_end are visible to every row, stepped without masks (no window)
        full_end = key_begin
        if UNMASKED:
            visible = tl.minimum(key_end, first_pos + first_q + 1) - key_begin
            full_end = key_begin + tl.maximum(visible, 0) // BLOCK_N * BLOCK_N
        dd = tl.arange(0, D_PAD)
        d_ok = dd < D
        q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + head[:, None] * stride_qh + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if not QUANT:  # the dots run in the cache's dtype (an int8 cache's: in q's)
            q = q.to(k_ptr.dtype.element_ty)
        acc = tl.zeros((ROWS, D_PAD), dtype=tl.float32)
        m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((ROWS,), dtype=tl.float32)
        table = tables_ptr + b.to(tl.int64) * stride_bt
        k_at, v_at = k_ptr + h * stride_kh, v_ptr + h * stride_vh
        ks_at, vs_at = ks_ptr + h, vs_ptr + h  # scales (NB, BS, Hkv), contiguous
        stride_st = tl.num_programs(1)
        stride_sb = BS * stride_st
        if UNMASKED:  # (a constexpr branch: without it the kernel has one loop)
            for start in tl.range(key_begin, full_end, BLOCK_N, num_stages=LOOP_STAGES or None):  # (KernelConfig)
                acc, m_i, l_i = _keys_step(acc, m_i, l_i, q, start, key_end, pos, table, k_at, v_at, ks_at, vs_at,
                                           dd, d_ok, window, qk_scale, cap, stride_kb, stride_kt, stride_vb,
                                           stride_vt, stride_vd, stride_sb, stride_st, BLOCK_N, BS, SOFTCAP,
                                           WINDOW, IEEE, False, QUANT, V_RUN)
        for start in tl.range(full_end, key_end, BLOCK_N, num_stages=LOOP_STAGES or None):
            acc, m_i, l_i = _keys_step(acc, m_i, l_i, q, start, key_end, pos, table, k_at, v_at, ks_at, vs_at,
                                       dd, d_ok, window, qk_scale, cap, stride_kb, stride_kt, stride_vb,
                                       stride_vt, stride_vd, stride_sb, stride_st, BLOCK_N, BS, SOFTCAP,
                                       WINDOW, IEEE, True, QUANT, V_RUN)
        rows = (q_start + m).to(tl.int64)
        if SPLIT:  # unnormalized partial output + (max, sum) for the reduce; [t, head, part] of (T, Hq, P)
            at = (rows * (tl.num_programs(1) * GROUP) + head) * parts + part
            tl.store(part_out_ptr + at[:, None] * D_PAD + dd[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + at, m_i, mask=row_ok)
            tl.store(part_ml_ptr + ml_half + at, l_i, mask=row_ok)
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + dd[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _reduce_kernel(
        out_ptr, part_out_ptr, part_ml_ptr, seq_lens_ptr, qsl_ptr, num_seqs, ml_half, window, part_len, parts,
        stride_ot, stride_oh, P_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, WINDOW: tl.constexpr,
        SKIP_SINGLE: tl.constexpr, SKIP_FRESH: tl.constexpr,
    ):
        # program (token t, query head): merge the partitions that hold at least one of its keys
        t, head = tl.program_id(0), tl.program_id(1)
        b = _find_sequence(qsl_ptr, t, num_seqs, 1, False)
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + b)
        if (t - q_start >= q_len) | (SKIP_SINGLE & (q_len == 1)) | (SKIP_FRESH & (seq_len == q_len)):
            return  # (a one-query sequence's own launch wrote it; a fresh one the caller)
        pos = seq_len - q_len + t - q_start
        lo = 0
        if WINDOW:
            lo = pos - window + 1
        p = tl.arange(0, P_PAD)
        valid = (p < parts) & (p * part_len <= pos) & ((p + 1) * part_len > lo)
        at = (t.to(tl.int64) * tl.num_programs(1) + head) * parts + p
        m = tl.load(part_ml_ptr + at, mask=valid, other=float("-inf"))
        w = tl.where(valid, tl.exp2(m - tl.max(m, axis=0)), 0.0)
        total = tl.sum(tl.load(part_ml_ptr + ml_half + at, mask=valid, other=0.0) * w, axis=0)
        dd = tl.arange(0, D_PAD)
        acc = tl.load(part_out_ptr + at[:, None] * D_PAD + dd[None, :], mask=valid[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / total
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + head * stride_oh + dd, o.to(out_ptr.dtype.element_ty),
                 mask=dd < D)
