"""The multi-LoRA expand of a gate/up pair fused with SwiGLU: one pass from the packed GEMM output to the MLP's
hidden activation.

Math (the bank of :mod:`splice.kernels.multi_lora`; ``y`` (T, 2I) = [g | u] the packed gate/up GEMM output, ``s`` =
``slot[t]``, ``v_g`` / ``v_u`` the token's shrink outputs for gate and up, ``B`` (S, 2I, R) gate's rows first)::

    g' = round(y[t, :I] + B[s, :I] v_g)      u' = round(y[t, I:] + B[s, I:] v_u)      (no delta for slot -1)
    h[t] = round(silu(g') * u')              fp32 inside; rounding to y's dtype       h: (T, I)

which is ``swiglu_packed`` of ``y`` after ``multi_lora_expand`` (the same roundings), without writing ``y`` back and
reading it again: a step of T tokens saves ``4 T I`` element moves (T = 8,192 at Llama-3-8B's I = 14,336: 940 MB a
layer, ~0.3 ms at 3 TB/s), the expand's read-modify-write that dominated the adapters' cost in steps with prompts.

One launch, programs ``(p, column block)``: ``p`` below the shrink's tile count takes tile ``p`` of its plan
(tokens of one slot: two ``(BM, R) @ (R, BN)`` dots for the deltas); the programs after them take ``BM`` consecutive
tokens each and serve those of slot -1 (the plan holds adapted tokens only), so every row is written once.
:func:`expand_swiglu_reference` is the composition in plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splice.kernels.multi_lora import Shrunk, multi_lora_reference
from splice.kernels.swiglu import swiglu_reference

try:  # Triton only ships with CUDA builds of torch; the CPU path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["expand_swiglu_reference", "multi_lora_expand_swiglu"]


def expand_swiglu_reference(x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor) -> Tensor:
    """The module docstring's math, one token at a time: ``a`` (S, 2, R, K) the gate and up A (or (S, R, K) shared),
    ``b`` (S, 2I, R), ``x`` (T, K), ``y`` (T, 2I), ``slots`` (T,)."""
    width = y.shape[1] // 2
    if a.dim() == 3:
        a = torch.stack([a, a], dim=1)
    gate = multi_lora_reference(x, y[:, :width], a[:, 0], b[:, :width], slots)
    up = multi_lora_reference(x, y[:, width:], a[:, 1], b[:, width:], slots)
    return swiglu_reference(gate.float(), up.float()).to(y.dtype)


def multi_lora_expand_swiglu(shrunk: Shrunk, b: Tensor, y: Tensor, slots: Tensor, *,
                             block_n: int | None = None) -> Tensor:
    """``h`` (T, I) of the module docstring from ``shrunk`` (a two-member gate/up shrink of these ``slots`` (T,)
    int32), the group's ``b`` (S, 2I, R) with contiguous rows and ``y`` (T, 2I) with unit column stride.
    ``block_n``: output columns a program; by default 128 up to 512 tokens, else 64 (H200, 2026-12-06,
    ``benchmarks/lora_swiglu.py``: 50.0 against 59.5 us at 256 tokens, 116 against 123 at 2,048)."""
    split, _, members, rank = shrunk.u.shape
    tokens, width = y.shape[0], y.shape[1] // 2
    if members != 2 or b.shape[1] != y.shape[1] or y.shape[1] % 2 or y.stride(1) != 1 or b.stride(2) != 1 \
            or b.stride(1) != rank or slots.shape != (tokens,):
        raise ValueError(f"multi_lora_expand_swiglu: a gate/up shrink (2 members), B (S, 2I, R) with contiguous "
                         f"rows and y (T, 2I) with unit column stride expected, got u {tuple(shrunk.u.shape)}, "
                         f"B {tuple(b.shape)}, y {tuple(y.shape)}, slots {tuple(slots.shape)}")
    h = torch.empty(tokens, width, device=y.device, dtype=y.dtype)
    count, block_m = shrunk.plan.shape[0], shrunk.tiles.block_m
    if block_n is None:
        block_n = 128 if tokens <= 512 else 64
    if shrunk.ieee:  # exact fp32 dots on the FMA units: narrower blocks
        block_n = min(block_n, 32)
    grid = (count + -(-tokens // block_m), -(-width // block_n))
    shrunk.wait()
    _expand_swiglu[grid](shrunk.u, b, y, h, shrunk.plan, slots.to(torch.int32), tokens, width, split, count,
                         b.stride(0), y.stride(0), R=rank, BM=block_m, BN=block_n, IEEE=shrunk.ieee,
                         num_warps=shrunk.tiles.warps)
    return h


if triton is not None:

    @triton.jit
    def _delta(u_at, b_at, live, nn, n_ok, SPLIT, TILES, R: tl.constexpr, BM: tl.constexpr,
               IEEE: tl.constexpr):
        # (BM, BN) fp32: the tile's shrink output (its SPLIT partials summed) @ B rows nn^T, as multi_lora's expand
        rr = tl.arange(0, R)
        v = tl.zeros((BM, R), dtype=tl.float32)
        for j in range(SPLIT):
            v += tl.load(u_at + j * TILES * BM * 2 * R + rr[None, :], mask=live[:, None], other=0.0)
        bt = tl.load(b_at + nn[None, :] * R + rr[:, None], mask=n_ok[None, :], other=0.0)  # (R, BN)
        if IEEE:
            return tl.dot(v, bt, out_dtype=tl.float32, input_precision="ieee")
        return tl.dot(v.to(bt.dtype), bt, out_dtype=tl.float32)

    @triton.jit
    def _expand_swiglu(u_ptr, b_ptr, y_ptr, h_ptr, plan_ptr, slot_ptr, T, W, SPLIT, COUNT, stride_bs, stride_yt,
                       R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        # program (p, column block): p < COUNT the plan's tile p (adapted tokens of one slot), else BM consecutive
        # tokens of which those of slot -1 (module doc); u: (SPLIT, COUNT * BM, 2, R) fp32 partials
        p, nb = tl.program_id(0), tl.program_id(1)
        ii = tl.arange(0, BM)
        nn = nb * BN + tl.arange(0, BN)
        n_ok = nn < W
        if p < COUNT:
            head = plan_ptr + p * (BM + 2)
            n = tl.load(head + 1)
            live = ii < n
            rows = tl.load(head + 2 + ii, mask=live, other=0)
            b_at = b_ptr + tl.load(head).to(tl.int64) * stride_bs
        else:
            rows = (p - COUNT) * BM + ii
            live = (rows < T) & (tl.load(slot_ptr + rows, mask=rows < T, other=0) < 0)
            n = tl.sum(live.to(tl.int32), axis=0)
            b_at = b_ptr
        # Why the guard: every launch has both kinds of program, and where all tokens are adapted (the offline run,
        # a bank's decode) the base-row programs, about half the grid, have no row; a plan tile past the last one
        # has none either. Masked loads and stores still issue every instruction: such a program skips the body.
        if n > 0:
            if p < COUNT:
                u_at = u_ptr + (p * BM + ii[:, None]) * 2 * R
                dg = _delta(u_at, b_at, live, nn, n_ok, SPLIT, COUNT, R, BM, IEEE)
                du = _delta(u_at + R, b_at + W * R, live, nn, n_ok, SPLIT, COUNT, R, BM, IEEE)
            else:
                dg = tl.zeros((BM, BN), dtype=tl.float32)
                du = tl.zeros((BM, BN), dtype=tl.float32)
            inside = live[:, None] & n_ok[None, :]
            y_at = y_ptr + rows[:, None].to(tl.int64) * stride_yt + nn[None, :]
            g = tl.load(y_at, mask=inside, other=0.0)
            u = tl.load(y_at + W, mask=inside, other=0.0)
            g = (g.to(tl.float32) + dg).to(g.dtype).to(tl.float32)  # rounded as the expand stores y
            u = (u.to(tl.float32) + du).to(u.dtype).to(tl.float32)
            h = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows[:, None].to(tl.int64) * W + nn[None, :], h, mask=inside)
