"""Heterogeneous-batch LoRA: every token applies its own adapter, two launches per projection.

Math (Punica's SGMV/BGMV, S-LoRA): adapters live in a bank of ``S`` slots, ranks padded to ``R``
with zeros (a zero row of A and zero column of B add nothing), the scale folded into B:

    A: (S, R, K)   B: (S, N, R)   slot[t] in {-1, 0..S-1}   (-1: the base model, no delta)
    y[t] += B[slot[t]] @ (A[slot[t]] @ x[t])        x: (T, K)   y: (T, N)

The base matmul ``y = x W^T`` is computed once for the whole batch by the caller; only this low-rank
delta is per token. Two kernels, both over *tiles*: up to ``BM`` tokens that share a slot.

* :func:`multi_lora_shrink` (``u = A x``): program ``(p, j, g)`` finds its tile ``p`` on the device
  (below), reads the tile's rows of ``x`` and the ``j``-th slice of the input width of its slot's
  ``A`` (member ``g`` of a group of projections reading the same input, e.g. q/k/v), and writes a
  partial ``u``: (split, tiles * BM, G, R) fp32. Splitting the input width lets a decode batch of a
  few tiles fill the GPU.
* :func:`multi_lora_expand` (``y += B u``): program ``(p, n)`` sums the tile's partials and adds
  ``u @ B[slot][n-block]^T`` into the tile's rows of ``y``, in place; for one member, or for all of a
  group's members at once into their packed output ``[y_q | y_k | y_v]`` (one GEMM's), each column
  taking its member's ``u``: ``(BM, G*R) @ (G*R, BN)`` with B's rows of the other members masked off.
  Optionally it also rescales the adapted rows per slot, ``y[t] = f[slot] * (y[t] + delta) + c[slot]``
  (``factor`` / ``shift`` (S, N); DoRA served from a bank: ``f = g``, ``c = (1 - g) * bias``,
  :mod:`splice.lora.bank`), in the same pass over ``y``.

Tiles, found without a host sync (the slots stay on the device; the grids depend on shapes only, so
the launches can sit in a CUDA graph): every program counts the tokens of each slot, lays out each
slot's tokens in ``ceil(count / BM)`` consecutive tiles (slot order), finds the slot and first rank
of its own tile ``p`` and collects the tile's token indices in token order. At most
``ceil(T / BM) + min(T, S)`` tiles exist; programs past the last one return at once, and tokens of
slot -1 are in no tile (they cost a look at their slot). Each slot's ``A`` and ``B`` is read once per
tile whatever the token order (a decode batch's tokens arrive in sequence order, a prefill chunk's
tokens in one run). The shrink's first programs write the plan (slot, row count, token ids per tile)
for the expand. ``per_token`` launches one tile per token instead (no counting; the A/B of a slot
read once per token). The plan depends on the slots and the launch shape only, the same for every projection
of a step: :func:`plan_tiles` makes it once (one small launch) and a shrink given it (``plan=``) skips the
counting in every program (each of a decode shrink's ``tiles x splits x members`` programs counts all ``T``
tokens otherwise).

:func:`multi_lora_reference` is the plain per-token PyTorch reference; :func:`multi_lora` runs the
kernels on CUDA (or under ``TRITON_INTERPRET=1``) and a per-slot PyTorch path elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from splice.kernels import use_triton

try:  # Triton only ships with CUDA builds of torch; the CPU path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["Shrunk", "Tiles", "multi_lora", "multi_lora_expand", "multi_lora_reference", "multi_lora_shrink",
           "pad_rank", "plan_tiles", "tiles_for"]


def pad_rank(rank: int) -> int:
    """The bank's padded rank: a power of two >= 16 (``tl.dot`` needs tiles of 16)."""
    return max(16, 1 << (rank - 1).bit_length())


def multi_lora_reference(x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor, *,
                         factor: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """``y`` (T, N) plus each token's own delta, one token at a time in fp32 (the reference); with
    ``factor`` / ``shift`` (S, N), an adapted token's row becomes ``factor[slot] * (y + delta) + shift[slot]``."""
    out = y.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            row = out[t].float() + b[slot].float() @ (a[slot].float() @ x[t].float())
            if factor is not None and shift is not None:
                row = factor[slot].float() * row + shift[slot].float()
            out[t] = row.to(y.dtype)
    return out


def _add(out: Tensor, rows: Tensor, delta: Tensor, picked: Tensor | int, factor: Tensor | None,
         shift: Tensor | None) -> None:
    """``out[rows] += delta`` (n, N) in place, or ``factor[picked] * (out[rows] + delta) + shift[picked]``
    (``picked``: the rows' slots, or one slot for all)."""
    if factor is None or shift is None:
        out.index_add_(0, rows, delta.to(out.dtype))
        return
    new = (out.index_select(0, rows).float() + delta.float()) * factor[picked].float() + shift[picked].float()
    out.index_copy_(0, rows, new.to(out.dtype))


def _multi_lora_torch(x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor, *, inplace: bool,
                      factor: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
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
        _add(out, adapted, torch.bmm(u, b.index_select(0, picked).transpose(1, 2))[:, 0], picked, factor, shift)
        return out
    for slot in used.tolist():
        rows = (slots == slot).nonzero().squeeze(-1)
        u = x.index_select(0, rows).to(a.dtype) @ a[slot].T  # (n, R)
        _add(out, rows, u @ b[slot].T, slot, factor, shift)
    return out


@dataclass(frozen=True, kw_only=True)
class Tiles:
    """A launch shape. ``block_m``: tokens per tile; ``k_split``: input columns per shrink program (a
    multiple of ``block_k``, its loop step); ``block_n``: output columns per expand program;
    ``warps``: per program, both kernels; ``per_token``: one tile per token, no counting."""

    block_m: int = 16
    k_split: int = 512
    block_k: int = 64
    block_n: int = 128
    warps: int = 4
    per_token: bool = False


@functools.lru_cache(maxsize=256)
def tiles_for(tokens: int, k: int) -> Tiles:
    """The launch shape for ``tokens`` tokens of width ``k`` (shapes only: a CUDA graph replays it).

    From the H200 sweep of ``benchmarks/multi_lora.py --sweep`` (2026-12-06, Llama-3-8B shapes, r16, µs for
    q / gate / down). A decode batch has few tiles (about one per adapter in use), so the width is cut in
    slices that multiply the programs: 512 columns for a small batch (32 tokens of 8 adapters: 8.5 / 9.2 /
    11.3, against 8.7 / 9.7 / 10.5 with 1,024), 1,024 from 128 tokens on (256 tokens of 64 adapters: 20.1 /
    29.4 / 40.5, against 23.9 / 33.8 / 58.4 with 512: the tiles are enough). Batches between were not swept.
    A prefill batch: 32 tokens a tile, 1,024-column slices, 4 warps (2,048 tokens of 8 adapters: 35.2 / 61.5 /
    64.1, against 49.5 / 74.7 / 74.5 with 64-token tiles, the width in 4 slices and 8 warps)."""
    if tokens <= 512:
        return Tiles(block_m=16, k_split=512 if tokens < 128 else 1024, block_k=128, block_n=128)
    return Tiles(block_m=32, k_split=1024, block_k=64, block_n=128, warps=4)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class Shrunk:
    """What :func:`multi_lora_shrink` leaves for :func:`multi_lora_expand`: ``u`` (split, tiles * BM,
    G, R) fp32 partial sums, ``plan`` (tiles, 2 + BM) int32: each tile's slot, row count and token ids."""

    u: Tensor
    plan: Tensor
    tiles: Tiles
    ieee: bool  # fp32 bank: exact fp32 dots, no TF32 rounding
    ready: torch.cuda.Event | None = None  # recorded on the side stream the shrink ran on (``side=``)
    inputs: tuple[Tensor, ...] = ()  # what that launch reads, alive until the expand is queued behind it

    def wait(self) -> None:
        """Queue the caller's next launch (an expand) behind the shrink, where it ran on a side stream."""
        if self.ready is not None:
            torch.cuda.current_stream(self.u.device).wait_event(self.ready)


def _plan_shape(tokens: int, capacity: int, tiles: Tiles) -> int:
    """Tiles to launch: at most ceil(T / BM) full tiles plus one partly filled tile per slot in use."""
    if tiles.per_token:
        return tokens
    return _cdiv(tokens, tiles.block_m) + min(tokens, capacity)


def _counting(capacity: int) -> dict[str, int]:
    """The tile counter's bins (a power of two > the slots) and token chunk (constexprs of ``_tile``)."""
    bins = max(2, 1 << (capacity - 1).bit_length())
    return {"NB": bins, "CHUNK": max(16, min(256, 4096 // bins))}


def plan_tiles(slots: Tensor, *, capacity: int, tiles: Tiles) -> Tensor:
    """The tiles of ``slots`` (T,) int32 (module doc) as :func:`multi_lora_shrink` would find them: (count, 2 + BM)
    int32, each tile's slot, row count and token ids. For a bank of ``capacity`` slots and launch shape
    ``tiles``; one launch, no host sync (a CUDA graph can hold it)."""
    tokens = slots.shape[0]
    count = _plan_shape(tokens, capacity, tiles)
    plan = torch.empty(count, 2 + tiles.block_m, device=slots.device, dtype=torch.int32)
    _plan[(count,)](plan, slots.to(torch.int32), tokens, BM=tiles.block_m, PER_TOKEN=tiles.per_token,
                    **_counting(capacity))
    return plan


def multi_lora_shrink(x: Tensor, a: Tensor, slots: Tensor, *, tiles: Tiles | None = None,
                      plan: Tensor | None = None, side: torch.cuda.Stream | None = None) -> Shrunk:
    """``u = A[slot[t]] x[t]`` per token and group member, left as partial sums for the expand.

    ``x`` (T, K) with unit column stride; ``a`` (S, R, K) or (S, G, R, K) (``G`` projections that read
    the same input, e.g. a view of a bank's grouped storage), unit stride along K; ``slots`` (T,) int32
    on ``x``'s device. ``plan``: these slots' :func:`plan_tiles` for this bank's capacity and these ``tiles``
    (the programs then read their tile instead of counting it). ``side``: a CUDA stream to run the launch on, after
    what the current stream has queued, so that it overlaps what the caller queues next (the base GEMM of the same
    input); the expands then wait for it (:meth:`Shrunk.wait`). CUDA (or the Triton interpreter) only."""
    if a.dim() == 3:
        a = a[:, None]
    capacity, members, rank, k = a.shape
    tokens = x.shape[0]
    tiles = tiles or tiles_for(tokens, k)
    if x.stride(1) != 1:
        x = x.contiguous()
    if a.stride(3) != 1:
        a = a.contiguous()
    count = _plan_shape(tokens, capacity, tiles)
    split = _cdiv(k, tiles.k_split)
    u = torch.empty(split, count * tiles.block_m, members, rank, device=x.device, dtype=torch.float32)
    if plan is not None and (plan.shape != (count, 2 + tiles.block_m) or plan.dtype != torch.int32):
        raise ValueError(f"multi_lora_shrink: a plan for {tokens} tokens, {capacity} slots and {tiles} is "
                         f"({count}, {2 + tiles.block_m}) int32, got {tuple(plan.shape)} {plan.dtype}")
    planned = plan is not None
    if plan is None:
        plan = torch.empty(count, 2 + tiles.block_m, device=x.device, dtype=torch.int32)
    ieee = a.dtype == torch.float32
    slots = slots.to(torch.int32)
    # Everything is allocated on the current stream; the inputs stay referenced by the result, so no block the
    # side launch reads is handed out again before the expand has waited for it.
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        _shrink[(count, split, members)](
            x, a, u, plan, slots, tokens, k, tiles.k_split, x.stride(0), a.stride(0), a.stride(1),
            a.stride(2), R=rank, BM=tiles.block_m, BK=tiles.block_k, **_counting(capacity), PER_TOKEN=tiles.per_token,
            PLANNED=planned, IEEE=ieee, num_warps=tiles.warps,
        )
    if side is None:
        return Shrunk(u, plan, tiles, ieee)
    ready = torch.cuda.Event()
    ready.record(side)
    return Shrunk(u, plan, tiles, ieee, ready, (x, a, slots))


def multi_lora_expand(shrunk: Shrunk, b: Tensor, y: Tensor, *, member: int = 0,
                      widths: tuple[int, ...] | None = None, factor: Tensor | None = None,
                      shift: Tensor | None = None) -> None:
    """``y[t] += B[slot[t]] u[t]`` in place, for group member ``member`` of ``shrunk``, or with ``widths``
    for every member at once into their packed output (a GEMM's ``[y_0 | y_1 | ...]``).

    ``b`` (S, N, R), unit stride along R and between its rows (a view of a bank's stacked B is fine);
    ``y`` (T, N) with unit column stride (rows may be strided). ``widths``: each member's output
    width, summing to N; member ``g`` owns columns ``sum(widths[:g]) ..`` of ``b`` and ``y`` (at most 3).
    ``factor`` / ``shift`` (S, N) fp32, unit column stride: adapted rows become
    ``factor[slot] * (y + B u) + shift[slot]`` (base rows, slot -1, stay as they are)."""
    split, _, members, rank = shrunk.u.shape
    tiles, n = shrunk.tiles, b.shape[1]
    if y.stride(1) != 1 or b.stride(2) != 1 or b.stride(1) != rank:
        raise ValueError("multi_lora_expand: y needs unit column stride and B (S, N, R) contiguous rows")
    if factor is not None and shift is not None:
        if factor.stride(1) != 1 or shift.stride() != factor.stride() or factor.shape[1] != n:
            raise ValueError(f"multi_lora_expand: factor and shift must be (S, {n}) alike, unit column stride")
        affine, f_stride = (factor, shift), factor.stride(0)
    else:
        affine, f_stride = (y, y), 0  # unread (AFFINE off)
    if widths is None:
        widths, block_n = (n,), tiles.block_n
    elif sum(widths) != n or len(widths) != members or not 1 <= len(widths) <= 3:
        raise ValueError(f"multi_lora_expand: widths {widths} must be the {members} members' and sum to {n}")
    else:  # every member's B rows sit in one (G_pad * R, BN) operand: narrower blocks keep it in registers
        member, block_n = 0, max(32, tiles.block_n // 2)
    if shrunk.ieee:  # exact fp32 dots run on the FMA units and take far more registers a tile
        block_n = min(block_n, 64 if len(widths) == 1 else 32)
    ends = [sum(widths[: i + 1]) for i in range(len(widths))] + [n] * 2
    count = shrunk.plan.shape[0]
    shrunk.wait()
    _expand[(count, _cdiv(n, block_n))](
        shrunk.u, b, y, shrunk.plan, *affine, n, split, member, members, len(widths), count, b.stride(0),
        y.stride(0), f_stride, ends[0], ends[1], R=rank, BM=tiles.block_m, BN=block_n,
        GP=1 << (len(widths) - 1).bit_length(), IEEE=shrunk.ieee, AFFINE=factor is not None and shift is not None,
        num_warps=tiles.warps,
    )


def multi_lora(
    x: Tensor, y: Tensor, a: Tensor, b: Tensor, slots: Tensor, *, row_len: int = 1, kernels: bool | None = None,
    inplace: bool = False, tiles: Tiles | None = None, factor: Tensor | None = None, shift: Tensor | None = None,
) -> Tensor:
    """``y + delta``: token ``t`` (of ``x`` (T, K)) adds ``B[s] A[s] x[t]`` with ``s = slots[t // row_len]``.

    ``slots`` (T // row_len,) int: one slot per row of ``row_len`` consecutive tokens (a prefill
    row), or per token with ``row_len = 1`` (decode). Returns a tensor of ``y``'s dtype.
    ``kernels``: force the Triton kernels on or off (default: on for CUDA tensors). ``inplace``:
    add into ``y`` itself (no autograd) instead of a copy. ``tiles``: the launch shape (default
    :func:`tiles_for`). ``factor`` / ``shift`` (S, N): adapted tokens' rows become
    ``factor[s] * (y + delta) + shift[s]`` (see :func:`multi_lora_expand`).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (T, K) and y (T, N) expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != slots.numel() * row_len:
        raise ValueError(f"{x.shape[0]} tokens but {slots.numel()} slots of {row_len} tokens each")
    per_token = slots if row_len == 1 else slots.repeat_interleave(row_len)
    if kernels is None:
        kernels = triton is not None and use_triton(x)
    if not kernels:
        return _multi_lora_torch(x, y, a, b, per_token, inplace=inplace, factor=factor, shift=shift)
    out = y if inplace and y.stride(1) == 1 else y.contiguous().clone()
    multi_lora_expand(multi_lora_shrink(x, a, per_token, tiles=tiles), b.contiguous(), out, factor=factor, shift=shift)
    return out


if triton is not None:

    @triton.jit
    def _tile(slot_ptr, T, p, BM: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr, PER_TOKEN: tl.constexpr):
        # Tile p of the slot-sorted layout: (its slot, its row count n <= BM, (BM,) token ids in token order).
        ii = tl.arange(0, BM)
        if PER_TOKEN:
            slot = tl.load(slot_ptr + p)
            n = (slot >= 0).to(tl.int32)
            rows = tl.where(ii == 0, p, 0)
        else:
            bins = tl.arange(0, NB)
            counts = tl.zeros((NB,), dtype=tl.int32)  # tokens per slot
            for c0 in range(0, T, CHUNK):
                tt = c0 + tl.arange(0, CHUNK)
                sl = tl.load(slot_ptr + tt, mask=tt < T, other=-1)
                counts += tl.sum((sl[None, :] == bins[:, None]).to(tl.int32), axis=1)
            spans = (counts + BM - 1) // BM  # tiles per slot
            ends = tl.cumsum(spans, axis=0)
            slot = tl.sum((ends <= p).to(tl.int32))  # NB when p is past the last tile
            first = (p - tl.sum(tl.where(bins == slot, ends - spans, 0))) * BM  # rank of the tile's first token
            n = tl.minimum(tl.maximum(tl.sum(tl.where(bins == slot, counts, 0)) - first, 0), BM)
            rows = tl.zeros((BM,), dtype=tl.int32)
            if n > 0:
                seen = tl.sum(tl.zeros((1,), dtype=tl.int32))
                for c0 in range(0, T, CHUNK):
                    tt = c0 + tl.arange(0, CHUNK)
                    hit = tl.load(slot_ptr + tt, mask=tt < T, other=-1) == slot
                    rank = seen + tl.cumsum(hit.to(tl.int32), axis=0) - 1 - first  # the row each token takes
                    take = hit[None, :] & (rank[None, :] == ii[:, None])  # (BM, CHUNK)
                    rows += tl.sum(tl.where(take, tt[None, :], 0), axis=1)
                    seen += tl.sum(hit.to(tl.int32))
        return slot, n, rows

    @triton.jit
    def _plan(plan_ptr, slot_ptr, T, BM: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr,
              PER_TOKEN: tl.constexpr):
        # plan row p = (slot, row count, BM token ids) of tile p
        p = tl.program_id(0)
        slot, n, rows = _tile(slot_ptr, T, p, BM, NB, CHUNK, PER_TOKEN)
        head = plan_ptr + p * (BM + 2)
        tl.store(head, slot)
        tl.store(head + 1, n)
        tl.store(head + 2 + tl.arange(0, BM), rows)

    @triton.jit
    def _shrink(x_ptr, a_ptr, u_ptr, plan_ptr, slot_ptr, T, K, KS, stride_xt, stride_as, stride_ag, stride_ar,
                R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr,
                PER_TOKEN: tl.constexpr, PLANNED: tl.constexpr, IEEE: tl.constexpr):
        # u[j, p*BM + i, g, :] = x[rows[i], j-th K slice] @ A[slot, g, :, j-th K slice]^T: (BM, KS) @ (KS, R)
        p, j, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tiles, members = tl.num_programs(0), tl.num_programs(2)
        ii = tl.arange(0, BM)
        head = plan_ptr + p * (BM + 2)
        if PLANNED:  # plan_tiles wrote it
            slot = tl.load(head)
            n = tl.load(head + 1)
            rows = tl.load(head + 2 + ii)
        else:
            slot, n, rows = _tile(slot_ptr, T, p, BM, NB, CHUNK, PER_TOKEN)
            if (j == 0) & (g == 0):  # the plan the expand reads
                tl.store(head, slot)
                tl.store(head + 1, n)
                tl.store(head + 2 + ii, rows)
        if n > 0:
            rr = tl.arange(0, R)
            live = ii[:, None] < n
            acc = tl.zeros((BM, R), dtype=tl.float32)
            a_at = a_ptr + slot.to(tl.int64) * stride_as + g * stride_ag
            x_at = x_ptr + rows[:, None].to(tl.int64) * stride_xt
            for k0 in range(j * KS, tl.minimum(j * KS + KS, K), BK):
                kk = k0 + tl.arange(0, BK)
                xt = tl.load(x_at + kk[None, :], mask=live & (kk[None, :] < K), other=0.0)
                at = tl.load(a_at + rr[None, :] * stride_ar + kk[:, None], mask=kk[:, None] < K, other=0.0)
                if IEEE:
                    acc += tl.dot(xt.to(at.dtype), at, out_dtype=tl.float32, input_precision="ieee")
                else:
                    acc += tl.dot(xt.to(at.dtype), at, out_dtype=tl.float32)
            u_at = u_ptr + ((j * tiles * BM + p * BM + ii[:, None]) * members + g) * R + rr[None, :]
            tl.store(u_at, acc, mask=live)

    @triton.jit
    def _expand(u_ptr, b_ptr, y_ptr, plan_ptr, f_ptr, c_ptr, N, SPLIT, first, G, COUNT, TILES, stride_bs, stride_yt,
                stride_fs, END0, END1, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GP: tl.constexpr,
                IEEE: tl.constexpr, AFFINE: tl.constexpr):
        # y[rows, n-block] += sum_g (sum_j u[j, tile rows, first + g]) @ B[slot][n-block of member g]^T:
        # (BM, GP*R) @ (GP*R, BN), column c belonging to member g = (c >= END0) + (c >= END1) < COUNT;
        # AFFINE: then y[rows, n-block] = f[slot, n-block] * y + c[slot, n-block]
        p, nb = tl.program_id(0), tl.program_id(1)
        head = plan_ptr + p * (BM + 2)
        n = tl.load(head + 1)
        if n > 0:
            slot = tl.load(head)
            ii = tl.arange(0, BM)
            live = ii[:, None] < n
            rows = tl.load(head + 2 + ii, mask=ii < n, other=0)
            qq = tl.arange(0, GP * R)
            gq, rq = qq // R, qq % R  # member and rank of each column of u / row of the B operand
            u = tl.zeros((BM, GP * R), dtype=tl.float32)
            u_at = u_ptr + ((p * BM + ii[:, None]) * G + first + gq[None, :]) * R + rq[None, :]
            for j in range(SPLIT):
                u += tl.load(u_at + j * TILES * BM * G * R, mask=live & (gq[None, :] < COUNT), other=0.0)
            nn = nb * BN + tl.arange(0, BN)
            owner = (nn >= END0).to(tl.int32) + (nn >= END1).to(tl.int32)
            bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + nn[None, :] * R + rq[:, None],
                         mask=(nn[None, :] < N) & (gq[:, None] == owner[None, :]), other=0.0)
            if IEEE:
                delta = tl.dot(u, bt, out_dtype=tl.float32, input_precision="ieee")
            else:
                delta = tl.dot(u.to(bt.dtype), bt, out_dtype=tl.float32)
            inside = live & (nn[None, :] < N)
            y_at = y_ptr + rows[:, None].to(tl.int64) * stride_yt + nn[None, :]
            yv = tl.load(y_at, mask=inside, other=0.0)
            out = yv.to(tl.float32) + delta
            if AFFINE:
                f_at = slot.to(tl.int64) * stride_fs + nn
                out = out * tl.load(f_ptr + f_at, mask=nn < N, other=1.0)[None, :] \
                    + tl.load(c_ptr + f_at, mask=nn < N, other=0.0)[None, :]
            tl.store(y_at, out.to(yv.dtype), mask=inside)
