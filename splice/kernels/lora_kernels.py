"""Triton kernels for the LoRA branch, with the dropout mask regenerated in registers.

Shapes: ``x`` (N, K) bf16/fp16 row-major (N tokens, K = in_features), ``A`` (R, K) fp32,
``T`` (N, R) fp32, ``D`` the seeded dropout of :mod:`splice.kernels.dropout` of element ``(n, k)``
(the same mask :func:`~splice.kernels.dropout.dropout` draws for ``x``).

* :func:`lora_down`: ``U = D(x) A^T`` (N, R) fp32 -- the adapter's first matmul;
* :func:`tn_reduce`: ``T^T D(x)`` (R, K) fp32 -- ``dA`` (and, without dropout, ``dB^T`` from
  ``U`` and the output gradient);
* :func:`lora_dx_add_`: ``dx += D(T A)`` in place -- the adapter's input gradient;
* :func:`lora_b_grads`: ``(s G B, s U^T G)`` -- the backward's ``T`` and ``dB^T`` from the output gradient ``G``
  (N, O) 16-bit, ``B`` (O, R), ``U`` (N, R) fp32: what ``lora_down(G, B^T)`` and ``tn_reduce(U, G)`` give, from
  one read of ``G`` instead of two (``G`` is the largest tensor the adapter's backward reads: 4,096 x 14,336 for
  gate and up at config C's 4,096 tokens). Programs own a column block of ``G`` and a range of rows; ``T``'s
  partial sums over column blocks and ``dB``'s over row ranges meet in fp32 atomics.

``members > 1`` (sibling adapters over one ``x``, :mod:`splice.kernels.lora_group`, with dropout): ``A`` is
``G`` stacked ``(r, K)`` blocks and ``T`` / ``U`` ``G`` column blocks of ``r``, member ``g`` with its own mask
``D_g`` (keys row ``g`` of a ``(G, 2)`` tensor): ``U_g = D_g(x) A_g^T``, ``dA_g = T_g^T D_g(x)``, ``dx +=
sum_g D_g(T_g A_g)``. The member is the fastest grid axis of the first two, so the programs of one ``x``
tile are launched together and all but the first should find it in L2 (not profiled); the third loops over
the members and writes ``dx`` once.

fp32 operands (``A``, ``T``) enter the bf16 tensor-core dots split in two, ``hi = bf16(v)``,
``lo = bf16(v - hi)``, so products carry ~16 mantissa bits while the 16-bit activations are read
once and never upcast in memory: the adapter math is as exact as PEFT's fp32 path at the cost of
a memory-bound read of ``x``. Dropout costs no extra pass: the mask is a hash of the (row, column).
Reductions over tokens are split across programs and combined with fp32 atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import HAS_TRITON
from .dropout import as_keys, threshold

__all__ = ["TILES", "Tiles", "lora_b_grads", "lora_down", "lora_dx_add_", "tn_reduce"]


@dataclass(frozen=True)
class Tiles:
    """Launch shape of one kernel: a (bn, bk) tile per program, ``warps``, software-pipeline
    ``stages``, and reductions split until about ``waves`` programs per SM are in flight.
    ``x_major`` (``tn_reduce`` only): accumulate ``(D(x)^T t)`` (bk, r), so the x tile is the tensor-core
    product's M side (Hopper's wgmma needs M >= 64; with the rank there it falls back to ``mma.sync``)."""

    bn: int
    bk: int
    warps: int = 4
    stages: int = 3
    waves: int = 2
    x_major: bool = False


# Defaults per kernel: the fastest over Llama-8B's widths at 4,096 tokens among the launch shapes
# benchmarks/lora_kernel_tuning.py timed on an H200 (2026-11-26), then "reduce" and "dx" again with the column-pair
# dropout hash, from CUDA graphs on an H100 (2026-12-06, --quick --graphs), weighted by config C's calls a step:
# reduce 12.3 -> 11.1 ms a step, dx 6.3 -> 5.8 (results in docs/benchmarks.md). "reduce" with the x tile on the
# tensor cores' M side (x_major), same method, H100, 2026-12-06 (sweep13): over the dA shapes with dropout 0.05
# (16x4096, 48x4096, 16x14336) 19.2 / 46.7 / 61.4 us against 22.6 / 53.5 / 70.9, without dropout (dA and dB) no
# slower anywhere (dB 16x1024 7.5 against 10.3).
# "b_grads" (bn rows a loop step, bk columns a program): the best of benchmarks/lora_kernel_tuning.py's eight over
# the output gradients of k/v, q/o/down and gate/up weighted by their calls a layer (H100, 2026-12-07, b20b, CUDA
# graphs): 9.7 / 24.3 / 62.8 us at 1,024 / 4,096 / 14,336 columns against lora_down + tn_reduce's 11.2 / 23.6 / 85.4
TILES = {"down": Tiles(64, 64, 4, 3, 6), "reduce": Tiles(64, 64, 4, 4, 4, x_major=True), "dx": Tiles(32, 128, 4, 1),
         "b_grads": Tiles(64, 128, 4, 4, 8)}

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .dropout import keep_mask, load_keys

    @triton.jit(do_not_specialize=["threshold"])
    def _lora_down(x_ptr, a_ptr, u_ptr, N, K, R, RT, k_per_split, keys_ptr, threshold, scale,
                   BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, DROPOUT: tl.constexpr,
                   ATOMIC: tl.constexpr):
        # program (member, row block, K split); R: rows of A a member, RT: columns of U (R x members)
        member = tl.program_id(0)
        k1, k2 = load_keys(keys_ptr + 2 * member)  # unused (and never loaded) without DROPOUT
        a_ptr += member * R * K
        rows = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
        rr = tl.arange(0, RP)
        k_start = tl.program_id(2) * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BN, RP), dtype=tl.float32)
        for k0 in range(0, k_per_split, BK):
            cols = k_start + k0 + tl.arange(0, BK)
            offs = rows[:, None] * K + cols[None, :]
            x = tl.load(x_ptr + offs, mask=(rows[:, None] < N) & (cols[None, :] < k_stop), other=0.0)
            if DROPOUT:
                x = tl.where(keep_mask(rows, k_start + k0, k1, k2, threshold, BK), x, tl.zeros_like(x))
            a = tl.load(a_ptr + rr[:, None] * K + cols[None, :],
                        mask=(rr[:, None] < R) & (cols[None, :] < k_stop), other=0.0)
            a_hi = a.to(x.dtype)
            a_lo = (a - a_hi.to(tl.float32)).to(x.dtype)
            acc += tl.dot(x, tl.trans(a_hi))
            acc += tl.dot(x, tl.trans(a_lo))
        acc *= scale
        out = u_ptr + rows[:, None] * RT + member * R + rr[None, :]
        inside = (rows[:, None] < N) & (rr[None, :] < R)
        if ATOMIC:
            tl.atomic_add(out, acc, mask=inside, sem="relaxed")
        else:
            tl.store(out, acc, mask=inside)

    @triton.jit(do_not_specialize=["threshold"])
    def _tn_reduce(t_ptr, x_ptr, out_ptr, N, K, R, RT, n_per_split, keys_ptr, threshold, scale,
                   BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, DROPOUT: tl.constexpr,
                   X_MAJOR: tl.constexpr):
        # program (member, column block, N split): member's R rows of out from its R columns of T (RT wide)
        member = tl.program_id(0)
        k1, k2 = load_keys(keys_ptr + 2 * member)
        t_ptr += member * R
        out_ptr += member * R * K
        col0 = tl.program_id(1) * BK
        cols = col0.to(tl.int64) + tl.arange(0, BK)
        rr = tl.arange(0, RP)
        n_start = tl.program_id(2) * n_per_split
        n_stop = tl.minimum(n_start + n_per_split, N)
        acc = tl.zeros((BK, RP) if X_MAJOR else (RP, BK), dtype=tl.float32)
        for n0 in range(0, n_per_split, BN):
            rows = (n_start + n0 + tl.arange(0, BN)).to(tl.int64)
            offs = rows[:, None] * K + cols[None, :]
            x = tl.load(x_ptr + offs, mask=(rows[:, None] < n_stop) & (cols[None, :] < K), other=0.0)
            if DROPOUT:
                x = tl.where(keep_mask(rows, col0, k1, k2, threshold, BK), x, tl.zeros_like(x))
            t = tl.load(t_ptr + rows[:, None] * RT + rr[None, :],
                        mask=(rows[:, None] < n_stop) & (rr[None, :] < R), other=0.0)
            t_hi = t.to(x.dtype)
            t_lo = (t - t_hi.to(tl.float32)).to(x.dtype)
            if X_MAJOR:  # (BK, BN) @ (BN, RP)
                xt = tl.trans(x)
                acc += tl.dot(xt, t_hi)
                acc += tl.dot(xt, t_lo)
            else:  # (RP, BN) @ (BN, BK)
                acc += tl.dot(tl.trans(t_hi), x)
                acc += tl.dot(tl.trans(t_lo), x)
        acc *= scale
        if X_MAJOR:
            tl.atomic_add(out_ptr + rr[None, :] * K + cols[:, None], acc,
                          mask=(rr[None, :] < R) & (cols[:, None] < K), sem="relaxed")
        else:
            tl.atomic_add(out_ptr + rr[:, None] * K + cols[None, :], acc,
                          mask=(rr[:, None] < R) & (cols[None, :] < K), sem="relaxed")

    @triton.jit(do_not_specialize=["threshold"])
    def _lora_dx(dx_ptr, t_ptr, a_ptr, N, K, R, keys_ptr, threshold, scale,
                 BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, DROPOUT: tl.constexpr,
                 MEMBERS: tl.constexpr):
        # dx tile += sum over the members of D_m(T_m A_m); T is (N, R * MEMBERS), A (R * MEMBERS, K)
        rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        col0 = tl.program_id(1) * BK
        cols = col0.to(tl.int64) + tl.arange(0, BK)
        rr = tl.arange(0, RP)
        offs = rows[:, None] * K + cols[None, :]
        inside = (rows[:, None] < N) & (cols[None, :] < K)
        dt = dx_ptr.dtype.element_ty
        total = tl.zeros((BN, BK), dtype=tl.float32)
        for m in tl.static_range(MEMBERS):
            t = tl.load(t_ptr + rows[:, None] * (R * MEMBERS) + m * R + rr[None, :],
                        mask=(rows[:, None] < N) & (rr[None, :] < R), other=0.0)
            a = tl.load(a_ptr + (m * R + rr[:, None]) * K + cols[None, :],
                        mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
            prod = tl.dot(t.to(dt), a.to(dt))  # (BN, BK): bf16 operands suffice for a bf16 gradient
            if DROPOUT:
                k1, k2 = load_keys(keys_ptr + 2 * m)
                prod = tl.where(keep_mask(rows, col0, k1, k2, threshold, BK), prod, 0.0)
            total += prod
        if DROPOUT:
            total *= scale
        dx = tl.load(dx_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (dx + total).to(dt), mask=inside)

    @triton.jit
    def _b_grads(g_ptr, bt_ptr, u_ptr, t_ptr, db_ptr, N, OUT, R, n_per_split, scale,
                 BN: tl.constexpr, BO: tl.constexpr, RP: tl.constexpr):
        # program (column block, N split): T[rows] += s G[rows, cols] B[cols] for each BN rows of its range
        # (the column blocks' partials meet in atomics), dB^T[:, cols] += s U[rows]^T G[rows, cols] summed over
        # the range (the ranges' partials meet in atomics). G (N, OUT), B^T (R, OUT), U and T (N, R), dB^T (R, OUT)
        cols = tl.program_id(0).to(tl.int64) * BO + tl.arange(0, BO)
        rr = tl.arange(0, RP)
        col_ok = cols < OUT
        r_ok = rr < R
        dt = g_ptr.dtype.element_ty
        bt = tl.load(bt_ptr + rr[:, None] * OUT + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        b_hi = bt.to(dt)
        b_lo = (bt - b_hi.to(tl.float32)).to(dt)
        n_start = tl.program_id(1) * n_per_split
        n_stop = tl.minimum(n_start + n_per_split, N)
        acc = tl.zeros((BO, RP), dtype=tl.float32)
        for n0 in range(0, n_per_split, BN):
            rows = (n_start + n0 + tl.arange(0, BN)).to(tl.int64)
            row_ok = rows < n_stop
            g = tl.load(g_ptr + rows[:, None] * OUT + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            part = tl.dot(g, tl.trans(b_hi))
            part += tl.dot(g, tl.trans(b_lo))  # (BN, RP)
            rank_at = rows[:, None] * R + rr[None, :]
            # relaxed: nothing here reads what another program added (the kernel's end orders them); Triton's
            # default (acq_rel) fences every step's loads behind the atomics (b20, H100: 0.57-0.96x the two kernels)
            tl.atomic_add(t_ptr + rank_at, part * scale, mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")
            u = tl.load(u_ptr + rank_at, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            u_hi = u.to(dt)
            u_lo = (u - u_hi.to(tl.float32)).to(dt)
            gt = tl.trans(g)  # (BO, BN): the G tile on the tensor cores' M side, as tn_reduce's x_major
            acc += tl.dot(gt, u_hi)
            acc += tl.dot(gt, u_lo)
        acc *= scale
        tl.atomic_add(db_ptr + rr[None, :] * OUT + cols[:, None], acc, mask=r_ok[None, :] & col_ok[:, None],
                      sem="relaxed")


_SMS: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests on a CPU)
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _rp(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _dropout_args(p: float, keys: int | Tensor, alpha: float, like: Tensor, members: int = 1
                  ) -> tuple[Tensor, int, float]:
    """(keys pointer, threshold, scale); without dropout the pointer is never read. ``members > 1``: one
    key pair a member, ``keys`` (members, 2) int32."""
    if p > 0 and members > 1:
        if not isinstance(keys, Tensor) or keys.shape != (members, 2) or keys.dtype != torch.int32:
            raise ValueError(f"{members} members with dropout take ({members}, 2) int32 keys, got {keys!r}")
        return keys.to(like.device).contiguous(), threshold(p), alpha / (1.0 - p)
    return (as_keys(keys, like.device) if p > 0 else like), threshold(p), alpha / (1.0 - p)


def _token_splits(n: int, blocks: int, ts: Tiles, device: torch.device) -> tuple[int, int]:
    """(ranges, tokens a range) of a reduction over ``n`` tokens split until about ``ts.waves`` programs an SM run
    beside ``blocks`` column blocks; each range at least two ``ts.bn`` steps, a whole number of them."""
    split = max(1, min(triton.cdiv(n, 2 * ts.bn), (ts.waves * _sms(device)) // blocks))
    n_per_split = triton.cdiv(triton.cdiv(n, split), ts.bn) * ts.bn
    return triton.cdiv(n, n_per_split), n_per_split


def _member_rows(rows: int, members: int, what: str) -> int:
    """Rows (or columns) of one member of ``rows`` split evenly in ``members``."""
    if members < 1 or rows % members:
        raise ValueError(f"{what}: {rows} rows do not split into {members} equal members")
    return rows // members


def lora_down(x: Tensor, a: Tensor, p: float = 0.0, keys: int | Tensor = 0, *, alpha: float = 1.0,
              tiles: Tiles | None = None, members: int = 1) -> Tensor:
    """``alpha * D(x) @ a^T`` in fp32: x (N, K) contiguous 16-bit, a (R, K) fp32 contiguous; ``members``:
    ``a`` is that many equal blocks of rows, each with its own mask (module doc)."""
    n, k = x.shape
    rt = a.shape[0]
    r = _member_rows(rt, members, "lora_down")
    t = tiles or TILES["down"]
    blocks = triton.cdiv(n, t.bn)
    split = max(1, min(triton.cdiv(k, 4 * t.bk), (t.waves * _sms(x.device)) // blocks))
    k_per_split = triton.cdiv(triton.cdiv(k, split), t.bk) * t.bk
    split = triton.cdiv(k, k_per_split)
    u = (torch.zeros if split > 1 else torch.empty)((n, rt), dtype=torch.float32, device=x.device)
    _lora_down[(members, blocks, split)](x, a, u, n, k, r, rt, k_per_split, *_dropout_args(p, keys, alpha, x, members),
                                BN=t.bn, BK=t.bk, RP=_rp(r), DROPOUT=p > 0, ATOMIC=split > 1,
                                num_warps=t.warps, num_stages=t.stages)
    return u


def tn_reduce(t: Tensor, x: Tensor, p: float = 0.0, keys: int | Tensor = 0, *, alpha: float = 1.0,
              tiles: Tiles | None = None, members: int = 1) -> Tensor:
    """``alpha * t^T @ D(x)`` in fp32: t (N, R) fp32, x (N, K) 16-bit, contiguous; result (R, K);
    ``members``: ``t``'s columns are that many equal blocks, each with its own mask (module doc)."""
    n, k = x.shape
    rt = t.shape[1]
    r = _member_rows(rt, members, "tn_reduce")
    ts = tiles or TILES["reduce"]
    blocks = triton.cdiv(k, ts.bk)
    split, n_per_split = _token_splits(n, blocks, ts, x.device)
    out = torch.zeros((rt, k), dtype=torch.float32, device=x.device)
    _tn_reduce[(members, blocks, split)](t, x, out, n, k, r, rt, n_per_split, *_dropout_args(p, keys, alpha, x, members),
                                BN=ts.bn, BK=ts.bk, RP=_rp(r), DROPOUT=p > 0, X_MAJOR=ts.x_major,
                                num_warps=ts.warps, num_stages=ts.stages)
    return out


def lora_dx_add_(dx: Tensor, t: Tensor, a: Tensor, p: float, keys: int | Tensor, *,
                 tiles: Tiles | None = None, members: int = 1) -> Tensor:
    """``dx += D(t @ a)`` in place: dx (N, K) 16-bit, t (N, R) fp32, a (R, K) fp32, contiguous;
    ``members``: ``dx += sum_g D_g(t_g @ a_g)`` over that many equal blocks (module doc)."""
    n, k = dx.shape
    r = _member_rows(t.shape[1], members, "lora_dx_add_")
    ts = tiles or TILES["dx"]
    _lora_dx[(triton.cdiv(n, ts.bn), triton.cdiv(k, ts.bk))](
        dx, t, a, n, k, r, *_dropout_args(p, keys, 1.0, dx, members), BN=ts.bn, BK=ts.bk, RP=_rp(r),
        DROPOUT=p > 0, MEMBERS=members, num_warps=ts.warps, num_stages=ts.stages)
    return dx


def lora_b_grads(g: Tensor, b_t: Tensor, u: Tensor, *, alpha: float = 1.0,
                 tiles: Tiles | None = None) -> tuple[Tensor, Tensor]:
    """``(alpha * g @ b_t^T, alpha * u^T @ g)`` in fp32 from one read of ``g``: g (N, O) 16-bit, b_t (R, O) fp32
    (``B^T``), u (N, R) fp32, all contiguous; results (N, R) and (R, O), as ``lora_down(g, b_t, alpha=alpha)`` and
    ``tn_reduce(u, g, alpha=alpha)`` (module doc)."""
    n, o = g.shape
    r = b_t.shape[0]
    if b_t.shape != (r, o) or u.shape != (n, r):
        raise ValueError(f"lora_b_grads: g (N, O), b_t (R, O) and u (N, R) expected, got {tuple(g.shape)}, "
                         f"{tuple(b_t.shape)}, {tuple(u.shape)}")
    ts = tiles or TILES["b_grads"]
    blocks = triton.cdiv(o, ts.bk)
    split, n_per_split = _token_splits(n, blocks, ts, g.device)
    t = torch.zeros((n, r), dtype=torch.float32, device=g.device)
    db_t = torch.zeros((r, o), dtype=torch.float32, device=g.device)
    _b_grads[(blocks, split)](g, b_t, u, t, db_t, n, o, r, n_per_split, alpha, BN=ts.bn, BO=ts.bk, RP=_rp(r),
                              num_warps=ts.warps, num_stages=ts.stages)
    return t, db_t
