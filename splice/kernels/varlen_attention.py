"""Causal attention over packed segments (variable length), with its backward: no mask tensor.

Layout: ``q`` is ``(T, Hq, D)`` and ``k`` / ``v`` are ``(T, Hkv, D)``, holding ``S`` segments back to
back; segment ``s`` owns rows ``cu[s] : cu[s + 1]`` (``cu = cu_seqlens``, ``(S + 1,)`` int32, ``cu[0] = 0``,
non-decreasing, ``cu[S] = T``; empty segments are allowed, e.g. trailing ones that keep the shape fixed).
For the query row ``t`` of segment ``s`` and head ``h`` (GQA: ``G = Hq // Hkv``, kv head ``h // G``)::

    z_j = scale * q_t . k_j              for rows j of segment s with j <= t (and j > t - window if window > 0)
    z_j = softcap * tanh(z_j / softcap)  if softcap > 0
    out_t = sum_j P_tj v_j,  P_t = softmax(z)   softmax in fp32, out in q's dtype

Backward, with ``dO`` the output's gradient and ``Delta_t = sum_d dO_t O_t``::

    dv_j = sum_t P_tj dO_t,   dP_tj = dO_t . v_j,   dZ_tj = P_tj (dP_tj - Delta_t)
    dS = scale * dZ (* (1 - (z / softcap)^2) with a softcap)
    dq_t = sum_j dS_tj k_j,   dk_j = sum_t dS_tj q_t      (dk, dv: summed over the G query heads of a kv head)

The Triton path (CUDA tensors) is a flash-attention forward (online softmax in fp32, base 2, the rows'
log-sum-exp kept for the backward) and a backward of three kernels: ``Delta``; dK/dV, one program per
``BLOCK_N`` keys of a kv head stepping over every query of its ``G`` heads that sees them (so no atomics and
no repeated K/V); dQ, one program per ``BLOCK_M`` queries of a head. Tiles are cut from the flat token
stream, not per segment: a query tile may span segments (each row finds its segment start by a binary
search over ``cu`` on the device) and steps over the keys from its first row's segment start to its last
row; a key tile steps over the queries up to its last key's segment end. Steps that every row of a tile
sees whole run without masks. The grid depends only on ``T``, never on ``S`` or the lengths, so the call
needs no host sync and a CUDA graph can hold it. fp16 / bf16 / fp32 (fp32: IEEE dots); any head_dim up to
256 (padded to a power of two under masks).

:func:`varlen_attention_reference` is plain PyTorch, one segment at a time (fp32 softmax, the masked
attention of :mod:`splice.kernels.paged_attention`); it is also the path off the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from splice.kernels import use_triton
from splice.kernels.paged_attention import _pow2
from splice.kernels.paged_reference import attend_one

try:  # Triton only ships with CUDA builds of torch; the CPU path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["KernelConfig", "default_config", "varlen_attention", "varlen_attention_reference"]

_LOG2E = 1.4426950408889634


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, window: int, softcap: float) -> None:
    """One clear line for inputs that do not fit the layout (module doc); no host sync."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"varlen_attention: q (T, Hq, D) and k, v (T, Hkv, D) expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: q heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if q.shape[2] > 256:
        raise ValueError(f"varlen_attention: head_dim {q.shape[2]} > 256 is not supported")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"varlen_attention: cu_seqlens must be (S + 1,) int32 segment starts ending at T, got "
                         f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"varlen_attention: q, k, v and cu_seqlens must share a device and q, k, v a dtype, got "
                         f"{q.device}/{cu_seqlens.device} and {q.dtype}/{k.dtype}/{v.dtype}")
    if window < 0 or softcap < 0:
        raise ValueError(f"varlen_attention: window ({window}) and softcap ({softcap}) must be >= 0 (0: none)")


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int,
                               scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
    """Packed causal attention (module doc) in plain PyTorch, differentiable: one fp32 masked attention per
    segment. Returns ``(T, Hq, D)`` in q's dtype. ``max_seqlen`` is unused here."""
    _check(q, k, v, cu_seqlens, window=window, softcap=softcap)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"varlen_attention: cu_seqlens must rise from 0 to T={q.shape[0]}, got "
                         f"{bounds[:4]}...{bounds[-2:]}")
    pieces = [attend_one(q[a:b], k[a:b], v[a:b], first_pos=0, key_start=0, scale=scale, window=window, softcap=softcap)
              for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(pieces).to(q.dtype)


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Tile sizes: the forward's ``(block_m queries, block_n keys)``, dK/dV's ``(bwd_m queries per step,
    bwd_n keys per program)``, dQ's ``(dq_m queries per program, dq_n keys per step)``; warps and stages."""

    block_m: int
    block_n: int
    bwd_m: int
    bwd_n: int
    dq_m: int
    dq_n: int
    num_warps: int = 4
    bwd_warps: int = 4
    num_stages: int = 2


def default_config(*, head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Forward tiles of 64 queries x 64 keys (32 keys at head_dim > 128 / fp32, which need the registers) over 4
    warps, 3 stages: on an H200 (``benchmarks/paged_attention.py --varlen-sweep``, 2026-12-07, head_dim 128,
    bf16) the fastest of 9 shapes for a 2,048-token causal prompt (119.5 us, 288 TFLOP/s, against 143.6 for 128 x
    64 over 8 warps, 2 stages) and for 8 x 512 (92.2 against 104.3); 64-wide backward tiles, not tuned."""
    wide = _pow2(head_dim) > 128 or dtype == torch.float32
    m, n = 64, 32 if wide else 64
    return KernelConfig(block_m=m, block_n=n, bwd_m=n, bwd_n=64 if not wide else 32, dq_m=64 if not wide else 32,
                        dq_n=n, num_warps=4, bwd_warps=8 if not wide else 4,
                        num_stages=3)


def _rows(x: Tensor) -> Tensor:
    """``x`` with a unit last stride (what the kernels index)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, *, scale: float, window: int, softcap: float,
                    cfg: KernelConfig) -> tuple[Tensor, Tensor]:
    """Output (T, Hq, D) and the rows' base-2 log-sum-exp (Hq, T) fp32."""
    tokens, hq, d = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(hq, tokens, device=q.device, dtype=torch.float32)
    segs = cu.numel() - 1
    qk_scale, cap = _scales(scale, softcap)
    _forward_kernel[(triton.cdiv(tokens, cfg.block_m), hq)](
        q, k, v, out, lse, cu, segs, segs.bit_length(), tokens, qk_scale, cap, window,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=hq // k.shape[1], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=d, D_PAD=max(16, _pow2(d)),
        SOFTCAP=softcap > 0, WINDOW=window > 0, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _scales(scale: float, softcap: float) -> tuple[float, float]:
    """Scores in base 2: ``scale * log2(e)`` folded into the dot, or (softcap) applied after the tanh."""
    return (scale, softcap * _LOG2E) if softcap > 0 else (scale * _LOG2E, 1.0)


def _launch_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor, *,
                     scale: float, window: int, softcap: float,
                     cfg: KernelConfig) -> tuple[Tensor, Tensor, Tensor]:
    tokens, hq, d = q.shape
    hkv = k.shape[1]
    d_pad = max(16, _pow2(d))
    delta = torch.empty(hq, tokens, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(tokens, 64), hq)](
        out, do, delta, tokens, out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        BLOCK=64, D=d, D_PAD=d_pad, num_warps=4)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    segs = cu.numel() - 1
    qk_scale, cap = _scales(scale, softcap)
    common = dict(D=d, D_PAD=d_pad, SOFTCAP=softcap > 0, WINDOW=window > 0, IEEE=q.dtype == torch.float32,
                  GROUP=hq // hkv, num_stages=cfg.num_stages)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
               do.stride(1))
    _dkdv_kernel[(triton.cdiv(tokens, cfg.bwd_n), hkv)](
        q, k, v, do, lse, delta, dk, dv, cu, segs, segs.bit_length(), tokens, qk_scale, cap, scale, window,
        *strides, dk.stride(0), dk.stride(1), BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, num_warps=cfg.bwd_warps,
        **common)
    _dq_kernel[(triton.cdiv(tokens, cfg.dq_m), hq)](
        q, k, v, do, lse, delta, dq, cu, segs, segs.bit_length(), tokens, qk_scale, cap, scale, window,
        *strides, dq.stride(0), dq.stride(1), BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, num_warps=cfg.bwd_warps,
        **common)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    """The Triton forward and backward; saves q, k, v, the output and the rows' log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float, window: int, softcap: float,
                cfg: KernelConfig) -> Tensor:
        q, k, v = _rows(q), _rows(k), _rows(v)
        out, lse = _launch_forward(q, k, v, cu, scale=scale, window=window, softcap=softcap, cfg=cfg)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.options = dict(scale=scale, window=window, softcap=softcap, cfg=cfg)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = _launch_backward(_rows(grad), q, k, v, out, lse, cu, **ctx.options)
        return dq, dk, dv, None, None, None, None, None


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int, scale: float,
                     window: int = 0, softcap: float = 0.0, config: KernelConfig | None = None) -> Tensor:
    """Causal attention within each packed segment (module doc): ``(T, Hq, D)`` in q's dtype, differentiable.

    The Triton kernels for CUDA tensors (no host sync: ``cu_seqlens`` is only read on the device), the
    reference elsewhere. ``max_seqlen``: a host upper bound on the segment lengths, as in flash-attn's varlen
    call (the tiles, :func:`default_config` or ``config``, no longer depend on it).
    """
    _check(q, k, v, cu_seqlens, window=window, softcap=softcap)
    if triton is None or not use_triton(q, k, v):
        return varlen_attention_reference(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale,
                                          window=window, softcap=softcap)
    cfg = config or default_config(head_dim=q.shape[2], dtype=q.dtype)
    out: Tensor = _VarlenAttention.apply(q, k, v, cu_seqlens.to(torch.int32), float(scale), int(window),
                                         float(softcap), cfg)
    return out


if triton is not None:
    from splice.kernels.paged_attention import _dot, _online_softmax, _tanh_cap

    @triton.jit
    def _segment_of(cu_ptr, t, num_segs, steps):
        # per element of t: the largest s in [0, num_segs - 1] with cu[s] <= t (binary search, steps >= log2 S)
        lo = tl.zeros_like(t)
        hi = lo + (num_segs - 1)
        for _ in range(steps):
            mid = (lo + hi + 1) // 2
            ok = tl.load(cu_ptr + mid) <= t
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        return lo

    @triton.jit
    def _load_tile(ptr, r64, h, stride_t, stride_h, dd, ok):
        # rows r64 of head h: a (rows, D_PAD) tile, 0 where not ok
        return tl.load(ptr + r64[:, None] * stride_t + h * stride_h + dd[None, :], mask=ok, other=0.0)

    @triton.jit
    def _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, r64, row_ok, q_ok, h, tokens, dd, stride_qt, stride_qh,
                    stride_dt, stride_dh):
        # what the backward needs of query rows r64 of head h: q, dO, log-sum-exp, Delta
        q = _load_tile(q_ptr, r64, h, stride_qt, stride_qh, dd, q_ok)
        do = _load_tile(do_ptr, r64, h, stride_dt, stride_dh, dd, q_ok)
        lse = tl.load(lse_ptr + h * tokens + r64, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + h * tokens + r64, mask=row_ok, other=0.0)
        return q, do, lse, delta

    @triton.jit
    def _query_tile(cu_ptr, num_segs, steps, tokens, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    D: tl.constexpr, D_PAD: tl.constexpr, WINDOW: tl.constexpr):
        # this program's query rows (int64, and the (rows, D_PAD) mask), their segment starts, and its key range
        # [lo, hi) split into a masked head [lo, a), an unmasked middle [a, b) (keys every row sees) and a
        # masked tail [b, hi)
        first = tl.program_id(0) * BLOCK_M
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < tokens
        dd = tl.arange(0, D_PAD)
        q_ok = row_ok[:, None] & (dd < D)[None, :]
        t = tl.minimum(rows, tokens - 1)
        seg_start = tl.load(cu_ptr + _segment_of(cu_ptr, t, num_segs, steps))
        last = tl.minimum(first + BLOCK_M, tokens) - 1
        lo = tl.min(seg_start, axis=0)
        a = tl.maximum(tl.max(seg_start, axis=0), lo)
        if WINDOW:
            lo = tl.maximum(lo, first - window + 1)
            a = tl.maximum(a, last - window + 1)
        a = lo + (a - lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # whole steps from lo: no key is stepped twice
        b = a + tl.maximum(first + 1 - a, 0) // BLOCK_N * BLOCK_N
        return rows.to(tl.int64), row_ok, q_ok, dd, t, seg_start, lo, a, b, last + 1

    @triton.jit
    def _scores(x, y, qk_scale, cap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
        # base-2 scores of x @ y (before masks); with a softcap, also tanh (for the backward's chain rule)
        s = _dot(x, y, IEEE) * qk_scale
        th = s
        if SOFTCAP:  # s natural: cap tanh(s / softcap), cap = softcap log2(e)
            th = _tanh_cap(s, cap)
            s = cap * th
        return s, th

    @triton.jit
    def _forward_step(acc, m_i, l_i, q, start, t, seg_start, k_at, v_at, tokens, dd, d_ok, window, qk_scale, cap,
                      stride_kt, stride_vt, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                      IEEE: tl.constexpr, MASK: tl.constexpr):
        # one BLOCK_N-key step of the online softmax (base 2)
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < tokens
        k = tl.load(k_at + kpos[None, :].to(tl.int64) * stride_kt + dd[:, None],
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # (D_PAD, BLOCK_N)
        v = tl.load(v_at + kpos[:, None].to(tl.int64) * stride_vt + dd[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, D_PAD)
        s, _ = _scores(q, k, qk_scale, cap, SOFTCAP, IEEE)
        if MASK:
            allowed = (kpos[None, :] >= seg_start[:, None]) & (kpos[None, :] <= t[:, None])
            if WINDOW:
                allowed = allowed & (kpos[None, :] > t[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
        return _online_softmax(acc, m_i, l_i, s, v, None, IEEE, MASK, False)  # no v scales: bf16 values

    @triton.jit
    def _forward_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, num_segs, steps, tokens, qk_scale, cap, window,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
    ):
        # program (query tile, head h): BLOCK_M consecutive rows of the flat stream
        h = tl.program_id(1)
        r64, row_ok, q_ok, dd, t, seg_start, lo, a, b, hi = _query_tile(cu_ptr, num_segs, steps, tokens, window,
                                                                        BLOCK_M, BLOCK_N, D, D_PAD, WINDOW)
        d_ok = dd < D
        q = _load_tile(q_ptr, r64, h, stride_qt, stride_qh, dd, q_ok)
        k_at, v_at = k_ptr + (h // GROUP) * stride_kh, v_ptr + (h // GROUP) * stride_vh
        acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(lo, a, BLOCK_N):
            acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, start, t, seg_start, k_at, v_at, tokens, dd, d_ok,
                                          window, qk_scale, cap, stride_kt, stride_vt, BLOCK_N, SOFTCAP, WINDOW,
                                          IEEE, True)
        for start in range(a, b, BLOCK_N):
            acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, start, t, seg_start, k_at, v_at, tokens, dd, d_ok,
                                          window, qk_scale, cap, stride_kt, stride_vt, BLOCK_N, SOFTCAP, WINDOW,
                                          IEEE, False)
        for start in range(b, hi, BLOCK_N):
            acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, start, t, seg_start, k_at, v_at, tokens, dd, d_ok,
                                          window, qk_scale, cap, stride_kt, stride_vt, BLOCK_N, SOFTCAP, WINDOW,
                                          IEEE, True)
        o = acc / l_i[:, None]  # every row sees itself: l_i > 0
        tl.store(o_ptr + r64[:, None] * stride_ot + h * stride_oh + dd[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=q_ok)
        tl.store(lse_ptr + h * tokens + r64, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _delta_kernel(o_ptr, do_ptr, delta_ptr, tokens, stride_ot, stride_oh, stride_dt, stride_dh,
                      BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        # Delta[h, t] = sum_d dO[t, h, d] O[t, h, d] in fp32
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        dd = tl.arange(0, D_PAD)
        ok = (rows < tokens)[:, None] & (dd < D)[None, :]
        r64 = rows.to(tl.int64)
        o = _load_tile(o_ptr, r64, h, stride_ot, stride_oh, dd, ok).to(tl.float32)
        do = _load_tile(do_ptr, r64, h, stride_dt, stride_dh, dd, ok).to(tl.float32)
        tl.store(delta_ptr + h * tokens + rows, tl.sum(o * do, axis=1), mask=rows < tokens)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, keys, seg_end, start, h, q_ptr, do_ptr, lse_ptr, delta_ptr, tokens, dd, d_ok,
                   window, qk_scale, cap, stride_qt, stride_qh, stride_dt, stride_dh, BLOCK_M: tl.constexpr,
                   SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr, MASK: tl.constexpr):
        # one BLOCK_M-query step of head h into a key tile's dK, dV (transposed scores: (BLOCK_N, BLOCK_M))
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < tokens
        q, do, lse, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, rows.to(tl.int64), r_ok,
                                        r_ok[:, None] & d_ok[None, :], h, tokens, dd, stride_qt, stride_qh,
                                        stride_dt, stride_dh)
        s, th = _scores(k, tl.trans(q), qk_scale, cap, SOFTCAP, IEEE)
        p = tl.exp2(s - lse[None, :])
        if MASK:
            allowed = (rows[None, :] >= keys[:, None]) & (rows[None, :] < seg_end[:, None]) & r_ok[None, :]
            if WINDOW:
                allowed = allowed & (rows[None, :] < keys[:, None] + window)
            p = tl.where(allowed, p, 0.0)
        dv += _dot(p.to(do.dtype), do, IEEE)
        ds = p * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        dk += _dot(ds.to(q.dtype), q, IEEE)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, num_segs, steps, tokens,
        qk_scale, cap, scale, window, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt,
        stride_dh, stride_gt, stride_gh, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
    ):
        # program (key tile, kv head): queries [lo, hi) of the group's heads, masked head [lo, a), unmasked
        # middle [a, b) (queries that see every key of the tile), masked tail [b, hi)
        kvh = tl.program_id(1)
        first = tl.program_id(0) * BLOCK_N
        keys = first + tl.arange(0, BLOCK_N)
        key_ok = keys < tokens
        seg_end = tl.load(cu_ptr + _segment_of(cu_ptr, tl.minimum(keys, tokens - 1), num_segs, steps) + 1)
        last = tl.minimum(first + BLOCK_N, tokens) - 1
        hi = tl.max(seg_end, axis=0)
        visible_end = tl.min(seg_end, axis=0)
        if WINDOW:
            hi = tl.minimum(hi, last + window)
            visible_end = tl.minimum(visible_end, first + window)
        a = tl.minimum(first + (last - first + BLOCK_M - 1) // BLOCK_M * BLOCK_M, hi)
        b = a + tl.maximum(visible_end - a, 0) // BLOCK_M * BLOCK_M
        dd = tl.arange(0, D_PAD)
        d_ok = dd < D
        k64 = keys.to(tl.int64)
        kv_ok = key_ok[:, None] & d_ok[None, :]
        k = _load_tile(k_ptr, k64, kvh, stride_kt, stride_kh, dd, kv_ok)
        v = _load_tile(v_ptr, k64, kvh, stride_vt, stride_vh, dd, kv_ok)
        dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
        for g in range(GROUP):
            h = kvh * GROUP + g
            for start in range(first, a, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, keys, seg_end, start, h, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                    tokens, dd, d_ok, window, qk_scale, cap, stride_qt, stride_qh, stride_dt,
                                    stride_dh, BLOCK_M, SOFTCAP, WINDOW, IEEE, True)
            for start in range(a, b, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, keys, seg_end, start, h, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                    tokens, dd, d_ok, window, qk_scale, cap, stride_qt, stride_qh, stride_dt,
                                    stride_dh, BLOCK_M, SOFTCAP, WINDOW, IEEE, False)
            for start in range(b, hi, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, keys, seg_end, start, h, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                    tokens, dd, d_ok, window, qk_scale, cap, stride_qt, stride_qh, stride_dt,
                                    stride_dh, BLOCK_M, SOFTCAP, WINDOW, IEEE, True)
        at = k64[:, None] * stride_gt + kvh * stride_gh + dd[None, :]
        tl.store(dk_ptr + at, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(dv_ptr + at, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _dq_step(dq, q, do, lse, delta, start, t, seg_start, k_at, v_at, tokens, dd, d_ok, window, qk_scale, cap,
                 stride_kt, stride_vt, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                 IEEE: tl.constexpr, MASK: tl.constexpr):
        # one BLOCK_N-key step into a query tile's dQ
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < tokens
        kv_ok = k_ok[:, None] & d_ok[None, :]
        k = _load_tile(k_at, kpos.to(tl.int64), 0, stride_kt, 0, dd, kv_ok)
        v = _load_tile(v_at, kpos.to(tl.int64), 0, stride_vt, 0, dd, kv_ok)
        s, th = _scores(q, tl.trans(k), qk_scale, cap, SOFTCAP, IEEE)
        p = tl.exp2(s - lse[:, None])
        if MASK:
            allowed = (kpos[None, :] >= seg_start[:, None]) & (kpos[None, :] <= t[:, None])
            if WINDOW:
                allowed = allowed & (kpos[None, :] > t[:, None] - window)
            p = tl.where(allowed, p, 0.0)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        return dq + _dot(ds.to(k.dtype), k, IEEE)

    @triton.jit
    def _dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, num_segs, steps, tokens,
        qk_scale, cap, scale, window, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt,
        stride_dh, stride_gt, stride_gh, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
    ):
        # program (query tile, head h): the forward's key range again
        h = tl.program_id(1)
        r64, row_ok, q_ok, dd, t, seg_start, lo, a, b, hi = _query_tile(cu_ptr, num_segs, steps, tokens, window,
                                                                        BLOCK_M, BLOCK_N, D, D_PAD, WINDOW)
        d_ok = dd < D
        q, do, lse, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, r64, row_ok, q_ok, h, tokens, dd,
                                        stride_qt, stride_qh, stride_dt, stride_dh)
        k_at, v_at = k_ptr + (h // GROUP) * stride_kh, v_ptr + (h // GROUP) * stride_vh
        dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        for start in range(lo, a, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, start, t, seg_start, k_at, v_at, tokens, dd, d_ok, window,
                          qk_scale, cap, stride_kt, stride_vt, BLOCK_N, SOFTCAP, WINDOW, IEEE, True)
        for start in range(a, b, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, start, t, seg_start, k_at, v_at, tokens, dd, d_ok, window,
                          qk_scale, cap, stride_kt, stride_vt, BLOCK_N, SOFTCAP, WINDOW, IEEE, False)
        for start in range(b, hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, start, t, seg_start, k_at, v_at, tokens, dd, d_ok, window,
                          qk_scale, cap, stride_kt, stride_vt, BLOCK_N, SOFTCAP, WINDOW, IEEE, True)
        tl.store(dq_ptr + r64[:, None] * stride_gt + h * stride_gh + dd[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_ok)
