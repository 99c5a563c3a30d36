"""The engine's multi-LoRA kernels before 2026-12-04 (commit 6304fdc), kept as ``benchmarks/multi_lora.py``'s
baseline ("legacy"): per-token BGMV, one shrink program per token over the whole input width and one
expand program per token and 128 output columns, whatever the token's neighbours' slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def multi_lora(x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor, *, inplace: bool = True) -> Tensor:
    """``y[t] += B[slot[t]] A[slot[t]] x[t]`` (slot -1: nothing), as the engine ran it (per-token slots)."""
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    out = y if inplace and y.is_contiguous() else y.contiguous().clone()
    tokens, k = x.shape
    n, r = b.shape[1], a.shape[1]
    u = torch.empty(tokens, r, device=x.device, dtype=torch.float32)
    _bgmv_shrink[(tokens,)](x, a, u, slots, k, R=r, BLOCK_K=256)
    _bgmv_expand[(tokens, triton.cdiv(n, 128))](u, b, out, slots, n, R=r, BLOCK_N=128)
    return out


@triton.jit
def _bgmv_shrink(x_ptr, a_ptr, u_ptr, slot_ptr, K, R: tl.constexpr, BLOCK_K: tl.constexpr):
    # u[t, :] = A[slot] @ x[t]: (R, K) @ (K,), fp32 accumulation
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        rr = tl.arange(0, R)
        acc = tl.zeros((R,), dtype=tl.float32)
        a_row = a_ptr + slot.to(tl.int64) * R * K
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + t.to(tl.int64) * K + kk, mask=kk < K, other=0.0).to(tl.float32)
            ak = tl.load(a_row + rr[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
            acc += tl.sum(ak.to(tl.float32) * xk[None, :], axis=1)
        tl.store(u_ptr + t * R + rr, acc)

@triton.jit
def _bgmv_expand(u_ptr, b_ptr, y_ptr, slot_ptr, N, R: tl.constexpr, BLOCK_N: tl.constexpr):
    # y[t, n-block] += B[slot][n-block] @ u[t]: (BLOCK_N, R) @ (R,)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, R)
        u = tl.load(u_ptr + t * R + rr)
        bk = tl.load(b_ptr + slot.to(tl.int64) * N * R + nn[:, None] * R + rr[None, :],
                     mask=nn[:, None] < N, other=0.0)
        delta = tl.sum(bk.to(tl.float32) * u[None, :], axis=1)
        y_at = y_ptr + t.to(tl.int64) * N + nn
        y = tl.load(y_at, mask=nn < N, other=0.0)
        tl.store(y_at, (y.to(tl.float32) + delta).to(y.dtype), mask=nn < N)
