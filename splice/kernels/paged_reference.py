"""The plain PyTorch path of paged attention: the reference its Triton kernels are tested against, and the CPU path.

The layout and the math are :mod:`splice.kernels.paged_attention`'s. :func:`paged_attention_reference` takes one
sequence at a time (its K/V gathered once, one masked fp32 attention for all its queries and heads);
:func:`decode_reference` serves a decode step (one query a sequence) with one batched attention over the padded
sequences; :func:`attend_one` is the attention of one sequence over dense keys, shared with
:mod:`splice.kernels.varlen_attention`'s reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splice.kernels.kv_cache import check_scales, dequantize_kv

__all__ = ["attend_one", "check_layout", "decode_reference", "paged_attention_reference"]


def check_layout(q: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                 query_start_loc: Tensor, key_scale: Tensor | None = None, value_scale: Tensor | None = None) -> None:
    """One clear line for inputs that do not fit the layout (splice.kernels.paged_attention), before any work."""
    check_scales("paged_attention", key_cache, key_scale)
    check_scales("paged_attention", value_cache, value_scale)
    if q.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"paged_attention: q (T, Hq, D) and caches (NB, BS, Hkv, D) expected, got "
                         f"{tuple(q.shape)}, {tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    hq, d = q.shape[1:]
    hkv = key_cache.shape[2]
    if key_cache.shape[3] != d or hq % hkv:
        raise ValueError(f"paged_attention: q heads {hq} must be a multiple of kv heads {hkv} and head dims "
                         f"must agree ({d} vs {key_cache.shape[3]})")
    b = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != b or query_start_loc.shape != (b + 1,):
        raise ValueError(f"paged_attention: block_tables (B, max_blocks), seq_lens (B,), query_start_loc (B+1,) "
                         f"expected, got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, "
                         f"{tuple(query_start_loc.shape)}")


def attend_one(q: Tensor, k: Tensor, v: Tensor, *, first_pos: int, key_start: int, scale: float, window: int,
               softcap: float) -> Tensor:
    """One sequence: ``q`` (L, Hq, D) at positions ``first_pos ..``, ``k``/``v`` (N, Hkv, D) the keys at
    positions ``key_start ..``; returns (L, Hq, D) fp32."""
    length, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qg = q.float().view(length, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * length, d)
    kt = k.float().permute(1, 2, 0)  # (Hkv, D, N)
    s = torch.bmm(qg, kt).mul_(scale).view(hkv, group, length, -1)  # (Hkv, G, L, N)
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap  # out of place: the varlen reference differentiates through it
    q_pos = torch.arange(first_pos, first_pos + length, device=q.device)[:, None]
    k_pos = torch.arange(key_start, key_start + k.shape[0], device=q.device)[None, :]
    masked = k_pos > q_pos
    if window > 0:
        masked |= k_pos <= q_pos - window
    s.masked_fill_(masked, float("-inf"))
    p = torch.softmax(s, dim=-1).view(hkv, group * length, -1)
    o = torch.bmm(p, v.float().transpose(0, 1))  # (Hkv, G * L, D)
    return o.view(hkv, group, length, d).permute(2, 0, 1, 3).reshape(length, hq, d)


def paged_attention_reference(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, *, block_tables: Tensor, seq_lens: Tensor,
    query_start_loc: Tensor, scale: float, max_query_len: int, max_seq_len: int, window: int = 0,
    softcap: float = 0.0, out: Tensor | None = None, key_scale: Tensor | None = None,
    value_scale: Tensor | None = None, skip_fresh: bool = False,
) -> Tensor:
    """Attention of every sequence's queries over its paged K/V (module doc), in plain PyTorch.

    One sequence at a time: its blocks are gathered once (only the ones a window can reach), then
    one masked fp32 attention serves all its queries and heads. ``max_query_len`` / ``max_seq_len``
    are unused here (they size the Triton grid). Rows of ``q`` past ``query_start_loc[B]`` give 0.
    ``skip_fresh``: fresh sequences (``seq_lens[b]`` equal to their query count) are left to the caller.
    """
    check_layout(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, key_scale, value_scale)
    result = torch.zeros_like(q) if out is None else out
    block_size = key_cache.shape[1]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, n in enumerate(lens):
        first, last = starts[b], starts[b + 1]
        if last == first or (skip_fresh and n == last - first):
            continue
        first_pos = n - (last - first)
        key_start = max(0, first_pos - window + 1) if window > 0 else 0
        lo_block = key_start // block_size
        ids = block_tables[b, lo_block : (n + block_size - 1) // block_size].long()
        key_start = lo_block * block_size
        k = _gather(key_cache, key_scale, ids).flatten(0, 1)[: n - key_start]
        v = _gather(value_cache, value_scale, ids).flatten(0, 1)[: n - key_start]
        o = attend_one(q[first:last], k, v, first_pos=first_pos, key_start=key_start, scale=scale,
                       window=window, softcap=softcap)
        result[first:last] = o.to(result.dtype)
    return result


def _gather(cache: Tensor, scale: Tensor | None, ids: Tensor) -> Tensor:
    """The blocks ``ids`` (any shape) of ``cache``: (*ids.shape, BS, Hkv, D), int8 ones dequantized (fp32)."""
    return cache[ids] if scale is None else dequantize_kv(cache[ids], scale[ids])


def decode_reference(q: Tensor, key_cache: Tensor, value_cache: Tensor, *, block_tables: Tensor, seq_lens: Tensor,
                     scale: float, window: int, softcap: float, out: Tensor | None, key_scale: Tensor | None,
                     value_scale: Tensor | None) -> Tensor:
    """Every sequence's one query at once (a decode step off the GPU): each sequence's K/V gathered into
    a padded (B, N, Hkv, D) batch, keys past its length (or outside its window) masked; fp32 math as
    the reference, one batched attention instead of one per sequence."""
    batch, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    lens = seq_lens.long()
    longest = int(lens.max())
    ids = block_tables[:, : -(-longest // block_size)].long()  # (B, nb)
    k = _gather(key_cache, key_scale, ids).flatten(1, 2)[:, :longest].float()  # (B, N, Hkv, D)
    v = _gather(value_cache, value_scale, ids).flatten(1, 2)[:, :longest].float()
    qg = q.float().view(batch, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, k) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    k_pos = torch.arange(longest, device=q.device)[None, :]
    masked = k_pos >= lens[:, None]  # (B, N): past the sequence
    if window > 0:
        masked |= k_pos <= (lens[:, None] - 1) - window
    s.masked_fill_(masked[:, None, None, :], float("-inf"))
    v.masked_fill_(masked[:, :, None, None], 0.0)  # rows past a sequence may hold anything (NaN too)
    o = torch.einsum("bhgn,bnhd->bhgd", torch.softmax(s, dim=-1), v).reshape(batch, hq, d)
    if out is None:
        return o.to(q.dtype)
    out.copy_(o)
    return out
