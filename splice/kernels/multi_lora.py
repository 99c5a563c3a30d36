"""Heterogeneous-batch LoRA: every token applies its own adapter, in one launch per projection.

Math (Punica's SGMV/BGMV, S-LoRA): adapters live in a bank of ``S`` slots, ranks padded to ``R``
with zeros (a zero row of A and zero column of B add nothing), the scale folded into B:

    A: (S, R, K)   B: (S, N, R)   slot[t] in {-1, 0..S-1}   (-1: the base model, no delta)
    y[t] += B[slot[t]] @ (A[slot[t]] @ x[t])        x: (T, K)   y: (T, N)

The base matmul ``y = x W^T`` is computed once for the whole batch by the caller; only this low-rank
delta is per token. Two kernel pairs (shrink ``u = A x``, expand ``y += B u``):

* gathered (BGMV, decode): one program per token (x a vector), the slot read on the device;
* segmented (SGMV, prefill): rows of ``L`` consecutive tokens share a slot; a program takes a
  ``BLOCK_M`` tile of one row's tokens and uses tensor-core ``tl.dot``.

No host sync: slots stay on the device. :func:`multi_lora_reference` is the plain per-token PyTorch
reference; :func:`multi_lora` picks the kernels on CUDA (Triton present) and a per-slot PyTorch
path elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton only ships with CUDA builds of torch; the CPU path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["multi_lora", "multi_lora_reference", "pad_rank"]


def pad_rank(rank: int) -> int:
    """The bank's padded rank: a power of two >= 16 (``tl.dot`` needs tiles of 16)."""
    return max(16, 1 << (rank - 1).bit_length())


def multi_lora_reference(x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor) -> Tensor:
    """``y`` (T, N) plus each token's own delta, one token at a time in fp32 (the reference)."""
    out = y.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            delta = b[slot].float() @ (a[slot].float() @ x[t].float())
            out[t] = (out[t].float() + delta).to(y.dtype)
    return out


def _multi_lora_torch(x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor, *, inplace: bool) -> Tensor:
    """The same on the CPU / without Triton: with at most two tokens per adapter (decode) one batched
    matmul pair over each token's gathered ``A[slot]`` (n, R, K) and ``B[slot]`` (n, N, R); otherwise
    one matmul pair per distinct slot (a prefill segment's tokens share their slot's weights)."""
    out = y if inplace else y.clone()
    adapted = (slots >= 0).nonzero().squeeze(-1)
    used = torch.unique(slots.index_select(0, adapted))
    if adapted.numel() <= 2 * used.numel():
        picked = slots.index_select(0, adapted).long()
        # Row vectors on the left: bmm with a (n, K, 1) right operand takes a far slower CPU path.
        rows = x.index_select(0, adapted).to(a.dtype)[:, None, :]  # (n, 1, K)
        u = torch.bmm(rows, a.index_select(0, picked).transpose(1, 2))  # (n, 1, R)
        out.index_add_(0, adapted, torch.bmm(u, b.index_select(0, picked).transpose(1, 2))[:, 0].to(y.dtype))
        return out
    for slot in used.tolist():
        rows = (slots == slot).nonzero().squeeze(-1)
        u = x.index_select(0, rows).to(a.dtype) @ a[slot].T  # (n, R)
        out.index_add_(0, rows, (u @ b[slot].T).to(y.dtype))
    return out


def multi_lora(
    x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor, *, row_len: int = 1, kernels: bool | None = None,
    inplace: bool = False,
) -> Tensor:
    """``y + delta``: token ``t`` (of ``x`` (T, K)) adds ``B[s] A[s] x[t]`` with ``s = slots[t // row_len]``.

    ``slots`` (T // row_len,) int: one slot per row of ``row_len`` consecutive tokens (a prefill
    row), or per token with ``row_len = 1`` (decode). Returns a new tensor of ``y``'s dtype.
    ``kernels``: force the Triton kernels on or off (default: on for CUDA tensors). ``inplace``:
    add into ``y`` itself (contiguous, no autograd) instead of a copy.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (T, K) and y (T, N) expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != slots.numel() * row_len:
        raise ValueError(f"{x.shape[0]} tokens but {slots.numel()} slots of {row_len} tokens each")
    if kernels is None:
        kernels = triton is not None and x.device.type == "cuda"
    if not kernels:
        return _multi_lora_torch(x, y, a, b, slots.repeat_interleave(row_len), inplace=inplace)
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    slots = slots.to(torch.int32).contiguous()
    out = y if inplace and y.is_contiguous() else y.contiguous().clone()
    tokens, k = x.shape
    n, r = b.shape[1], a.shape[1]
    u = torch.empty(tokens, r, device=x.device, dtype=torch.float32)
    if row_len == 1:
        _bgmv_shrink[(tokens,)](x, a, u, slots, k, R=r, BLOCK_K=256)
        _bgmv_expand[(tokens, triton.cdiv(n, 128))](u, b, out, slots, n, R=r, BLOCK_N=128)
    else:
        rows, block_m = slots.numel(), 16 if row_len <= 16 else 32
        m_blocks = triton.cdiv(row_len, block_m)
        ieee = a.dtype == torch.float32  # fp32 banks: no TF32 rounding in tl.dot
        _sgmv_shrink[(rows, m_blocks)](x, a, u, slots, k, row_len, R=r, BLOCK_M=block_m, BLOCK_K=64,
                                       IEEE=ieee)
        _sgmv_expand[(rows, m_blocks, triton.cdiv(n, 64))](
            u, b, out, slots, n, row_len, R=r, BLOCK_M=block_m, BLOCK_N=64, IEEE=ieee
        )
    return out


if triton is not None:

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

    @triton.jit
    def _sgmv_shrink(x_ptr, a_ptr, u_ptr, slot_ptr, K, L, R: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        # u[row tokens m-block, :] = x[m-block] @ A[slot]^T: (BLOCK_M, K) @ (K, R)
        row, mb = tl.program_id(0), tl.program_id(1)
        slot = tl.load(slot_ptr + row)
        if slot >= 0:
            mm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            tok = row.to(tl.int64) * L + mm
            rr = tl.arange(0, R)
            acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
            a_row = a_ptr + slot.to(tl.int64) * R * K
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + tok[:, None] * K + kk[None, :],
                             mask=(mm[:, None] < L) & (kk[None, :] < K), other=0.0)
                at = tl.load(a_row + rr[None, :] * K + kk[:, None], mask=kk[:, None] < K, other=0.0)
                if IEEE:
                    acc += tl.dot(xt.to(at.dtype), at, out_dtype=tl.float32, input_precision="ieee")
                else:
                    acc += tl.dot(xt.to(at.dtype), at, out_dtype=tl.float32)
            tl.store(u_ptr + tok[:, None] * R + rr[None, :], acc, mask=mm[:, None] < L)

    @triton.jit
    def _sgmv_expand(u_ptr, b_ptr, y_ptr, slot_ptr, N, L, R: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        # y[m-block, n-block] += u[m-block] @ B[slot][n-block]^T: (BLOCK_M, R) @ (R, BLOCK_N)
        row, mb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(slot_ptr + row)
        if slot >= 0:
            mm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            tok = row.to(tl.int64) * L + mm
            nn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            rr = tl.arange(0, R)
            u = tl.load(u_ptr + tok[:, None] * R + rr[None, :], mask=mm[:, None] < L, other=0.0)
            bt = tl.load(b_ptr + slot.to(tl.int64) * N * R + nn[None, :] * R + rr[:, None],
                         mask=nn[None, :] < N, other=0.0)
            if IEEE:
                delta = tl.dot(u, bt, out_dtype=tl.float32, input_precision="ieee")
            else:
                delta = tl.dot(u.to(bt.dtype), bt, out_dtype=tl.float32)
            inside = (mm[:, None] < L) & (nn[None, :] < N)
            y_at = y_ptr + tok[:, None] * N + nn[None, :]
            y = tl.load(y_at, mask=inside, other=0.0)
            tl.store(y_at, (y.to(tl.float32) + delta).to(y.dtype), mask=inside)
